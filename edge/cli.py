"""The `cytoedge` command. User errors end in one line on stderr and a documented exit code:
0 ok, 1 runtime problem (model, source, port), 2 bad config or usage, 130 interrupted."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from edge import __version__
from edge.errors import CytoedgeError

Handler = Callable[[argparse.Namespace], int]


def _add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="ONNX model file (default: the bundled model or model.path in config)")


def _add_config_flag(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", required=required, help="TOML config file (defaults are built in)")


def _add_curve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-key", metavar="FILE", help="CURVE: the publisher's public key file (.key)")
    parser.add_argument("--client-key", metavar="FILE", help="CURVE: this subscriber's secret key file (.key_secret)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cytoedge", description="Find, classify and publish blood cells at the microscope."
    )
    parser.add_argument("--version", action="version", version=f"cytoedge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    replay = commands.add_parser("replay", help="replay recorded frames through the pipeline and publish")
    replay.add_argument("path", help="folder of images, video file, or recorded session folder")
    replay.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555)")
    replay.add_argument("--pace", choices=("recorded", "max"), help="recorded timing (default) or as fast as possible")
    replay.add_argument("--fps", type=float, help="pace for folders of images (default 5)")
    replay.add_argument("--loop", action="store_true", default=None, help="start again at the end")
    replay.add_argument("--audit", metavar="FILE", help="append every cells message to this JSON Lines file")
    _add_model_flag(replay)
    _add_config_flag(replay)
    replay.set_defaults(handler=_lazy("edge.commands.pipeline_cmds", "replay"))

    run = commands.add_parser("run", help="the service: run the source named in the config")
    _add_config_flag(run, required=False)
    _add_model_flag(run)
    run.set_defaults(handler=_lazy("edge.commands.pipeline_cmds", "run"))

    watch = commands.add_parser("watch", help="print a live differential count from a publisher")
    watch.add_argument("endpoint", help="publisher endpoint, e.g. tcp://127.0.0.1:5555")
    watch.add_argument("--exit-on-end", action="store_true", help="exit when the publisher sends its final status")
    watch.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="exit with code 1 if nothing arrives for this many seconds (0 = wait forever)",
    )
    _add_curve_flags(watch)
    watch.set_defaults(handler=_lazy("edge.commands.watch", "main"))

    status = commands.add_parser("status", help="one-shot health of a running publisher (exit 0 healthy)")
    status.add_argument("endpoint", help="publisher endpoint, e.g. tcp://127.0.0.1:5555")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for a status (default 3)")
    status.add_argument("--strict", action="store_true", help="treat any warning as degraded")
    status.add_argument("--json", action="store_true", help="print the status message as JSON")
    _add_curve_flags(status)
    status.set_defaults(handler=_lazy("edge.commands.status", "main"))

    classify = commands.add_parser("classify", help="classify single-cell images (one cell per image)")
    classify.add_argument("paths", nargs="+", help="image files or folders of them")
    classify.add_argument("--json", action="store_true", help="one JSON object per image (default: a table)")
    classify.add_argument(
        "--um-per-px",
        type=float,
        help="scale of the images; crops the model's field from the centre (default: "
        "each image already covers the model's field, as in the PBC crops)",
    )
    _add_model_flag(classify)
    _add_config_flag(classify)
    classify.set_defaults(handler=_lazy("edge.commands.classify", "main"))

    bench = commands.add_parser("bench", help="replay as fast as possible and print throughput and latency")
    bench.add_argument("path", nargs="?", help="what to replay (default: the bundled samples)")
    bench.add_argument("--frames", type=int, default=400, help="frames to process, looping the input (default 400)")
    bench.add_argument(
        "--fps",
        type=float,
        help="offer frames at this rate, as a camera would (default: as fast as the pipeline takes them; "
        "then latency includes the wait behind the frame in progress)",
    )
    bench.add_argument(
        "--tiled",
        metavar="WxH",
        help="benchmark camera-sized frames (e.g. 1920x1080) tiled from PATH's frames (default: the bundled ones)",
    )
    bench.add_argument(
        "--in-memory",
        action="store_true",
        help="decode the input once and offer frames from memory, as a raw (CSI) camera does",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_flag(bench)
    _add_config_flag(bench)
    bench.set_defaults(handler=_lazy("edge.commands.bench", "main"))

    annotate = commands.add_parser("annotate", help="draw one frame's cells and labels into an image file")
    annotate.add_argument("frame", help="a smear frame (image file)")
    annotate.add_argument("--out", required=True, help="image to write (format from the suffix)")
    annotate.add_argument("--um-per-px", type=float, help="scale of the frame (default: microscope.um_per_px)")
    annotate.add_argument("--show-rbc", action="store_true", help="draw red-cell boxes too")
    annotate.add_argument("--json", action="store_true", help="also print the cell records as JSON")
    _add_model_flag(annotate)
    _add_config_flag(annotate)
    annotate.set_defaults(handler=_lazy("edge.commands.annotate", "main"))

    engine = commands.add_parser("engine", help="TensorRT engines for the Jetson GPU")
    engine_commands = engine.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    build = engine_commands.add_parser("build", help="build (or confirm) the TensorRT engine for a model")
    from edge.trt.builder import add_arguments as add_build_arguments  # imports no tensorrt

    add_build_arguments(build)
    _add_config_flag(build)
    build.set_defaults(handler=_lazy("edge.commands.engine_cmds", "build"))

    doctor = commands.add_parser(
        "doctor", help="versions, GPU, cameras, model, engine cache; exit 1 if the configured backend cannot run"
    )
    _add_config_flag(doctor)
    doctor.set_defaults(handler=_lazy("edge.doctor", "main"))

    record = commands.add_parser("record", help="record camera frames and timestamps into a session folder")
    record.add_argument("out", help="a new or empty folder")
    record.add_argument("--frames", type=int, help="stop after this many frames")
    record.add_argument("--seconds", type=float, help="stop after this many seconds")
    record.add_argument("--format", choices=("png", "jpg"), default="png", help="png = lossless (default)")
    record.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    _add_config_flag(record)
    record.set_defaults(handler=_lazy("edge.commands.camera_cmds", "record"))

    calibrate = commands.add_parser("calibrate", help="measure the microscope scale, focus, exposure and finder")
    calibrate_commands = calibrate.add_subparsers(dest="calibrate_command", metavar="WHAT", required=True)
    for what, text in (
        ("scale", "µm per pixel from the median red-cell diameter"),
        ("focus", "focus threshold from the sharpness of good frames"),
        ("site", "a new microscope in one go: scale, focus, exposure and finder, from its frames"),
    ):
        sub = calibrate_commands.add_parser(what, help=text)
        default_frames = 30 if what == "site" else 10
        sub.add_argument("--frames", type=int, default=default_frames,
                         help=f"frames to measure (default {default_frames})")
        sub.add_argument("--write", action="store_true", help="write the result into the --config file")
        if what == "site":
            sub.add_argument("--from", dest="frames_from", metavar="PATH",
                             help="recorded frames (folder, video or session) instead of the configured source")
        if what == "scale":
            sub.add_argument(
                "--stage-micrometer",
                type=float,
                metavar="UM_PER_PX",
                help="use this measured value (from a stage micrometer) instead of estimating",
            )
        _add_config_flag(sub)
        sub.set_defaults(handler=_lazy("edge.commands.camera_cmds", f"calibrate_{what}"))

    keys = commands.add_parser("keys", help="make CURVE key pairs for authenticated publishing")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    keys_new = keys_commands.add_parser("new", help="write NAME.key (public) and NAME.key_secret (owner-only)")
    keys_new.add_argument("name", help="e.g. publisher, or the display's host name")
    keys_new.add_argument("--dir", default=".", help="folder to write the files in (default: current folder)")
    keys_new.add_argument("--force", action="store_true", help="replace existing files of that name")
    keys_new.set_defaults(handler=_lazy("edge.commands.keys", "new"))

    models = commands.add_parser("models", help="site models: list them, choose the active one, roll back")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_list = models_commands.add_parser("list", help="the store's models, marking the active one")
    models_use = models_commands.add_parser("use", help="make a stored model the active one (checked first)")
    models_use.add_argument("name", help="a model folder in the store (see `cytoedge models list`)")
    models_rollback = models_commands.add_parser("rollback", help="go back to the model active before the last use")
    for sub, handler in ((models_list, "list_models"), (models_use, "use"), (models_rollback, "rollback")):
        sub.add_argument(
            "--store",
            metavar="DIR",
            help="model store (default: model.store from --config, else $CYTOEDGE_STATE_DIR/models, "
            "else ~/.local/share/cytoedge/models)",
        )
        _add_config_flag(sub)
        sub.set_defaults(handler=_lazy("edge.commands.models_cmds", handler))

    adapt = commands.add_parser(
        "adapt", help="build a site model from this microscope's reviewed cells (needs the [train] extra)"
    )
    from edge.commands.adapt import add_arguments as add_adapt_arguments

    add_adapt_arguments(adapt)
    adapt.set_defaults(handler=_lazy("edge.commands.adapt", "main"))

    report = commands.add_parser("report", help="a finished slide as a PDF report (+ JSON, FHIR R4), optionally signed")
    from edge.commands.report import add_arguments as add_report_arguments

    add_report_arguments(report)
    report.set_defaults(handler=_lazy("edge.commands.report", "main"))

    from edge.commands.collect import add_collect_arguments, add_ship_arguments

    ship = commands.add_parser("ship", help="send this edge's audit log and reviews to the lab (NATS JetStream)")
    add_ship_arguments(ship)
    ship.set_defaults(handler=_lazy("edge.commands.collect", "ship"))
    collect = commands.add_parser("collect", help="the lab collector: store every microscope's cells; lab page")
    add_collect_arguments(collect)
    collect.set_defaults(handler=_lazy("edge.commands.collect", "collect"))

    config = commands.add_parser("config", help="check or show configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(handler=_lazy("edge.commands.config_cmds", "check"))
    show = config_commands.add_parser("show", help="print the effective config (defaults + file)")
    show.add_argument("file", nargs="?", help="config file to overlay on the defaults")
    show.set_defaults(handler=_lazy("edge.commands.config_cmds", "show"))

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands: argparse._SubParsersAction) -> None:
    """The display's flags live with the display; its module (and zmq) load only when it runs."""
    from edge.display.flags import add_arguments

    display = commands.add_parser("display", help="serve the bench display page for a publisher")
    add_arguments(display)
    display.set_defaults(handler=_lazy("edge.display.server", "run"))


def _lazy(module: str, name: str) -> Handler:
    """Import command modules only when used, so `cytoedge --help` stays fast on a Jetson."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return handler


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.handler(args))
    except CytoedgeError as exc:
        print(f"cytoedge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
