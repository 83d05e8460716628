"""The ``microturn`` command line.

``microturn serve`` runs the gateway (all-in-one, or in front of ``microturn worker`` processes, which host the
engine); ``microturn probe`` is a browser-like client; ``microturn bench`` measures; ``microturn model`` makes
checkpoints. Every ``serve`` and ``worker`` flag can also be set by a ``MICROTURN_*`` environment variable (see
:mod:`microturn.config`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from microturn import logs


def _serve(args: argparse.Namespace) -> int:
    from microturn.config import Settings
    from webrtc_gateway.app import run
    from webrtc_gateway.front import run_front

    settings = Settings.from_env(
        host=args.host, port=args.port, model=args.model, checkpoint=args.checkpoint, device=args.device,
        redis=args.redis, token_secret=args.token_secret,
        allowed_origins=tuple(args.allowed_origins.split(",")) if args.allowed_origins else None,
        ice_servers=tuple(args.ice_servers.split(",")) if args.ice_servers else None,
        ice_host_addresses=tuple(args.ice_host.split(",")) if args.ice_host else None,
        api_keys=tuple(args.api_keys.split(",")) if args.api_keys else None,
        turn_urls=tuple(args.turn_urls.split(",")) if args.turn_urls else None, turn_secret=args.turn_secret,
        drain_timeout_s=args.drain_timeout, log_level=args.log_level, log_format=args.log_format,
        workers=tuple(args.workers.split(",")) if args.workers else None, worker_token=args.worker_token,
        max_session_s=args.max_session_s, max_sessions=args.max_sessions, processes=args.processes,
        advertise_url=args.advertise_url,
    )
    if settings.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {settings.processes}")
    logs.configure(settings.log_level, settings.log_format)
    where = f"workers {', '.join(settings.workers)}" if settings.workers else f"model {settings.model!r} in-process"
    if settings.processes > 1:
        where += f", in {settings.processes} gateway processes"
    print(f"microturn: serving {where} on http://{settings.host}:{settings.port}/", file=sys.stderr, flush=True)
    asyncio.run(run_front(settings) if settings.processes > 1 else run(settings))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from inference.worker import run_worker
    from microturn.config import Settings

    settings = Settings.from_env(
        host=args.host, port=args.port, model=args.model, checkpoint=args.checkpoint, device=args.device,
        worker_token=args.worker_token, worker_id=args.worker_id, worker_capacity=args.capacity,
        drain_timeout_s=args.drain_timeout, log_level=args.log_level, log_format=args.log_format,
    )
    if args.port is None and "MICROTURN_PORT" not in os.environ:
        settings = settings.replace(port=8090)
    logs.configure(settings.log_level, settings.log_format)
    print(f"microturn: worker {settings.worker_id} serving model {settings.model!r} on "
          f"ws://{settings.host}:{settings.port}/v1/worker", file=sys.stderr, flush=True)
    asyncio.run(run_worker(settings))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from microturn.probe import run_probe

    texts = []
    for item in args.text or []:
        text, _, at = item.rpartition("@")
        if not text:
            raise SystemExit(f"--text wants TEXT@SECONDS, got {item!r}")
        texts.append((text, float(at)))
    result = asyncio.run(run_probe(args.url, args.inp, args.out, video=args.video, texts=texts,
                                   tail_s=args.tail, loss=args.loss, ice_host=args.ice_host,
                                   relay_only=args.relay_only))
    print(json.dumps(result))
    return 0 if not result["errors"] else 1


def _bench(args: argparse.Namespace) -> int:
    if args.what == "background":
        from microturn.bench_background import bench_background

        result = bench_background(sessions=args.sessions, seconds=args.seconds,
                                  model=args.model or "reference",
                                  preset=args.preset, spin_s=args.spin, workers=args.workers)
    elif args.what == "cluster":
        from microturn.bench_cluster import bench_cluster

        result = bench_cluster(workers=args.workers or 2, sessions=args.sessions, seconds=args.seconds,
                               model=args.model or "echo", video=not args.no_video)
    elif args.what == "failover":
        from microturn.bench_failover import bench_failover

        result = bench_failover(trials=args.trials)
    elif args.what == "gateway":
        from microturn.bench_gateway import bench_gateway

        result = bench_gateway(sessions=args.sessions, seconds=args.seconds, video=args.video,
                               processes=args.processes, gateway_processes=args.gateway_processes,
                               model=args.model or "echo",
                               checkpoint=str(args.checkpoint) if args.checkpoint else None)
    else:
        from inference.bench_engine import bench_engine

        result = bench_engine(preset=args.preset, device=args.device)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from inference.trainer import Trainer, TrainSettings

    settings = TrainSettings(data=args.data, out=args.out or Path("runs") / args.preset, preset=args.preset,
                             steps=args.steps, batch=args.batch, window=args.window, lr=args.lr,
                             val_every=args.val_every, val_windows=args.val_windows, save_every=args.save_every,
                             seed=args.seed, device=args.device, threads=args.threads, init=args.init,
                             parts=args.parts, decision_weight=args.decision_weight, pause_weight=args.pause_weight,
                             answer_weight=args.answer_weight, answer_windows=args.answer_windows,
                             answer_kinds=args.answer_kinds, pause_windows=args.pause_windows,
                             late_replies=args.late_replies, audio_shift=args.audio_shift,
                             low_pass=args.low_pass,
                             flow_text_turns=args.flow_text_turns, listen_weight=args.listen_weight,
                             audio_context=args.audio_context, listen_at=args.listen_at,
                             listen_span=args.listen_span, video_thumbnail=args.video_thumbnail,
                             card_weight=args.card_weight)
    result = Trainer(settings).run()
    print(json.dumps(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from microturn.eval_duplex import eval_duplex

    result = eval_duplex(args.checkpoint, args.set, via=args.via, limit=args.limit, plot=args.plot,
                         device=args.device, model=args.model, seed=args.seed, scores=args.scores)
    print(json.dumps(result))
    return 0


def _data(args: argparse.Namespace) -> int:
    from inference.synth.generate import synthesize

    manifest = synthesize(args.out, args.hours, args.seed, workers=args.workers, split_seed=args.split_seed)
    print(f"wrote {manifest['conversations']} conversations ({manifest['hours_produced']:.3f} h) to {args.out}",
          file=sys.stderr)
    return 0


def _model(args: argparse.Namespace) -> int:
    from inference.checkpoint import init_checkpoint

    path = init_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote a randomly initialised {args.preset!r} checkpoint to {path}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from inference.checkpoint import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {args.checkpoint} as {args.dtype} to {path} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microturn", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway with an in-process engine")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", choices=["echo", "tally", "reference"])
    serve.add_argument("--checkpoint", type=Path, help="checkpoint folder for --model reference (default: the "
                       "trained tiny one that ships in inference/checkpoints/tiny)")
    serve.add_argument("--device", help="torch device for the model (cpu, cuda)")
    serve.add_argument("--redis", help="redis://HOST:PORT/DB for session records (default: in memory)")
    serve.add_argument("--token-secret", help="HMAC secret for session tokens (share it between gateways)")
    serve.add_argument("--allowed-origins", help="comma-separated browser origins allowed to call the API")
    serve.add_argument("--ice-servers", help="comma-separated STUN/TURN URLs handed to browsers")
    serve.add_argument("--ice-host", help="comma-separated local addresses to offer as ICE host candidates")
    serve.add_argument("--turn-urls", help="comma-separated turn:/turns: URLs handed to browsers with per-session "
                       "credentials (needs --turn-secret)")
    serve.add_argument("--turn-secret", help="the TURN server's static-auth-secret (coturn use-auth-secret); "
                       "better from MICROTURN_TURN_SECRET than on the command line")
    serve.add_argument("--api-keys", help="comma-separated keys that may create sessions (default: open, dev mode)")
    serve.add_argument("--drain-timeout", type=float, help="seconds live sessions may go on after SIGTERM")
    serve.add_argument("--max-session-s", type=float, help="sessions end after this many seconds (1800)")
    serve.add_argument("--workers", help="comma-separated ws://HOST:PORT/v1/worker URLs of inference workers "
                       "(a name that resolves to several addresses is several workers); default: in-process engine")
    serve.add_argument("--worker-token", help="shared secret the workers expect (better: MICROTURN_WORKER_TOKEN)")
    serve.add_argument("--advertise-url", help="this gateway's HTTP API as the other gateways of a fleet reach it "
                       "(http://POD_IP:8080); with --redis, a session call landing elsewhere is passed on here")
    serve.add_argument("--max-sessions", type=int, help="sessions this gateway holds at most, in all (64)")
    serve.add_argument("--processes", type=int, help="gateway processes behind the port, one event loop each; "
                       "about one per core (1)")
    serve.add_argument("--log-level")
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run an inference worker that gateways reach with --workers")
    worker.add_argument("--host")
    worker.add_argument("--port", type=int, help="default 8090")
    worker.add_argument("--model", choices=["echo", "tally", "reference"])
    worker.add_argument("--checkpoint", type=Path, help="checkpoint folder for --model reference (default: the "
                        "shipped tiny one)")
    worker.add_argument("--device", help="torch device for the model (cpu, cuda)")
    worker.add_argument("--capacity", type=int, help="sessions this worker takes at most")
    worker.add_argument("--worker-id", help="this worker's name in metrics, logs and the session store")
    worker.add_argument("--worker-token", help="shared secret gateways must show (better: MICROTURN_WORKER_TOKEN)")
    worker.add_argument("--drain-timeout", type=float, help="seconds to wait for gateways to move sessions away "
                        "after SIGTERM")
    worker.add_argument("--log-level")
    worker.add_argument("--log-format", choices=["text", "json"])
    worker.set_defaults(func=_worker)

    probe = sub.add_parser("probe", help="stream a WAV to a gateway like a browser and record the reply")
    probe.add_argument("url", nargs="+", help="gateway base URL(s), e.g. http://127.0.0.1:8080; with more than "
                       "one, the session resumes on the next when its connection fails")
    probe.add_argument("--in", dest="inp", type=Path, required=True, help="input WAV (any rate and channels)")
    probe.add_argument("--out", type=Path, required=True, help="output WAV, time-aligned with the input")
    probe.add_argument("--video", type=Path, help="an image or video file to show on the camera")
    probe.add_argument("--text", action="append", help='typed text to send, "TEXT@SECONDS" (repeatable)')
    probe.add_argument("--tail", type=float, default=1.0, help="seconds to keep recording after the input ends")
    probe.add_argument("--loss", type=float, default=0.0, help="fraction of uplink audio packets to drop")
    probe.add_argument("--ice-host", help="local address for ICE host candidates (default: loopback for a "
                       "loopback URL, else every interface)")
    probe.add_argument("--relay-only", action="store_true", help="ICE through the TURN server of the gateway's "
                       "grant only (relay candidates), as a browser behind a strict firewall")
    probe.set_defaults(func=_probe)

    bench = sub.add_parser("bench", help="measure the gateway or the engine; prints JSON")
    bench.add_argument("what", choices=["gateway", "engine", "failover", "background", "cluster"])
    bench.add_argument("--trials", type=int, default=20, help="failover: kill-and-resume trials")
    bench.add_argument("--sessions", type=int, default=1)
    bench.add_argument("--seconds", type=float, default=20.0)
    bench.add_argument("--video", action="store_true", help="gateway: clients also send video")
    bench.add_argument("--processes", type=int, default=2, help="gateway: load-client processes")
    bench.add_argument("--gateway-processes", type=int, default=1,
                       help="gateway: processes of the gateway under test (its serve --processes)")
    bench.add_argument("--model", help="gateway: the model the gateway serves (echo); cluster: the workers' (echo); "
                       "background: reference "
                       "(random tiny weights, the default) or echo")
    bench.add_argument("--checkpoint", type=Path, help="gateway: checkpoint for --model reference")
    bench.add_argument("--preset", default="tiny", help="engine: model preset")
    bench.add_argument("--device", default="cpu", help="engine: torch device")
    bench.add_argument("--spin", type=float, default=1.0, help="background: seconds of CPU each task spins")
    bench.add_argument("--workers", type=int, help="background: worker processes at once (default: the gateway's, "
                       "cores − 1); cluster: inference worker processes (2)")
    bench.add_argument("--no-video", action="store_true", help="cluster: micro-turns without a video frame")
    bench.add_argument("--json", action="store_true", help="one line of JSON")
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="train the reference model on a data set of `microturn data synth`")
    train.add_argument("--data", type=Path, required=True, help="folder with train/ and validation/ conversations")
    train.add_argument("--out", type=Path, help="run folder (default runs/PRESET); a folder with state.pt resumes")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch", type=int, default=4,
                       help="windows per step; with --parts flow: spoken micro-turns per step")
    train.add_argument("--window", type=int, default=40, help="micro-turns per window")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--val-every", type=int, default=100)
    train.add_argument("--val-windows", type=int, default=8, help="fixed validation windows (more: steadier)")
    train.add_argument("--save-every", type=int, default=200)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    train.add_argument("--init", type=Path, help="start from this checkpoint's weights instead of a random --preset")
    train.add_argument("--parts", choices=["all", "flow", "encoder", "stem"], default="all",
                       help="flow: train only the flow head (audio out), the rest of the model frozen; encoder: "
                       "train only the audio encoder, on its listening probe (with --listen-at encoder); stem: "
                       "train only the patch stem, to name cards drawn fresh each step from a frame's thumbnail "
                       "(with --video-thumbnail; --batch is cards per step)")
    train.add_argument("--decision-weight", type=float, default=0.0,
                       help="weight of an extra loss on the SPEAK/SILENT decision, its changes counted more "
                       "(inference.train.CHANGE_WEIGHT times; 0: off)")
    train.add_argument("--pause-weight", type=float, default=1.0,
                       help="how many times a micro-turn of the user's mid-question pauses counts in the "
                       "--decision-weight loss (1: like any other)")
    train.add_argument("--answer-weight", type=float, default=1.0,
                       help="how many times a micro-turn whose caption says an answer (a sum, a colour, a count, a "
                       "background result) counts in the loss on what the model says (1: like any other)")
    train.add_argument("--answer-windows", type=float, default=0.0,
                       help="the share of training windows placed around an answer, drawn from all of the train "
                       "split's answers, with the question before it (0: every window at a random place)")
    train.add_argument("--answer-kinds", type=lambda v: tuple(k for k in v.split(",") if k), default=(),
                       help="comma-separated kinds of question (arithmetic, counting, visual, background, ...) whose "
                       "answers the --answer-windows are placed around (default: all)")
    train.add_argument("--pause-windows", type=float, default=0.0,
                       help="the share of training windows placed around the end of one of the user's pauses, drawn "
                       "from all of the train split's pauses (mid-question, or between the sentences of a long "
                       "statement), with what was said before it (0: none)")
    train.add_argument("--late-replies", type=float, default=0.0,
                       help="the share of the model's replies said one or two micro-turns late in the training "
                       "windows, the decision of the micro-turns they should have started in not scored: it teaches a "
                       "model that missed a reply's first micro-turn to start in the next ones (0: none)")
    train.add_argument("--audio-shift", type=float, default=0.0,
                       help="the share of training windows whose user audio is moved against the 200 ms grid by a "
                       "random number of samples that keeps every label true, as the live path moves it "
                       "(inference.augment; 0: none)")
    train.add_argument("--low-pass", type=float, default=0.0,
                       help="the share of training windows whose user audio goes through a random 6-8 kHz low-pass, "
                       "as the live path's resamplers and codec thin its top band (inference.augment; 0: none)")
    train.add_argument("--listen-weight", type=float, default=0.0,
                       help="weight of a training-only probe that names the user's words in each micro-turn from "
                       "the trunk's state (inference.listen; 0: off)")
    train.add_argument("--flow-text-turns", type=int,
                       help="micro-turns of caption bytes the flow head sees (default: the preset's or --init's); "
                       "with --init, new weights for that part of the head")
    train.add_argument("--listen-at", choices=["trunk", "encoder"], default="trunk",
                       help="where the --listen-weight probe listens: the trunk's state, or the audio encoder's "
                       "features (which trains the encoder to recognise words)")
    train.add_argument("--listen-span", type=int, default=1,
                       help="micro-turns a word stays in the probe's targets from the one it ends in (1: the "
                       "words that just ended; more: what the user said lately, gathered by the trunk)")
    train.add_argument("--audio-context", type=int,
                       help="frames of the user's audio before each audio-in token that an audio encoder also "
                       "hears (inference.audio_encoder; default: the preset's or --init's, 0: none); with --init, "
                       "a new encoder that starts out changing nothing")
    train.add_argument("--card-weight", type=float, default=0.0,
                       help="weight of a training-only probe that names, from the trunk's state, the card the camera "
                       "shows in each micro-turn a visual question asks about (inference.card_probe; 0: off)")
    train.add_argument("--video-thumbnail", action=argparse.BooleanOptionalAction, default=None,
                       help="the first video slot of every micro-turn carries the camera frame's thumbnail (the "
                       "whole frame in one 40x40 patch), the others scan its patches (inference.video); with "
                       "--init, its stem and trunk learn to use it (default: as the --init checkpoint or the "
                       "preset has it; tiny has it)")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint; prints JSON")
    eval_sub = evaluate.add_subparsers(dest="what", required=True)
    duplex = eval_sub.add_parser("duplex", help="full-duplex behaviour on held-out conversations "
                                 "(Full-Duplex-Bench-v1-style metrics)")
    duplex.add_argument("--checkpoint", type=Path, help="the reference model's checkpoint folder (default: the "
                        "shipped one)")
    duplex.add_argument("--model", default="reference",
                        help="reference (default); echo: the diagnostic (its speech is the user's, a micro-turn "
                        "later); oracle: the conversations' own targets (the metrics' ceiling); oracle-glN: the "
                        "targets' mel through N-iteration Griffin-Lim (the ceiling with that vocoder; N=4 on tiny); "
                        "teacher-forced: the checkpoint's audio head speaking the targets, the rest of the model "
                        "fed the right answers (how clearly it can speak)")
    duplex.add_argument("--set", type=Path, required=True, help="a data set of `microturn data synth` (its test/ "
                        "split is used) or a folder of conversations")
    duplex.add_argument("--via", choices=["offline", "webrtc"], default="offline",
                        help="offline: step the model directly; webrtc: a gateway and a browser-like client, "
                        "in real time")
    duplex.add_argument("--limit", type=int, help="at most this many conversations")
    duplex.add_argument("--plot", type=Path, help="write a timeline PNG of user vs model speech here")
    duplex.add_argument("--scores", type=Path, help="write each conversation's counts here, one JSON line each (id, "
                        "scenario, turns and turns taken, pauses and pauses taken over, interruption stops, answers)")
    duplex.add_argument("--device", default="cpu")
    duplex.add_argument("--seed", type=int, default=0,
                        help="sampling seed of every offline session (through WebRTC the gateway draws them)")
    duplex.set_defaults(func=_eval)

    data = sub.add_parser("data", help="make training and evaluation data")
    data_sub = data.add_subparsers(dest="action", required=True)
    synth = data_sub.add_parser("synth", help="render scripted two-party conversations as micro-turn streams")
    synth.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    synth.add_argument("--hours", type=float, default=1.0, help="total audio to produce (about)")
    synth.add_argument("--seed", type=int, default=0, help="draws the conversations")
    synth.add_argument("--split-seed", type=int, default=0,
                       help="draws which voices and phrasings each split may use; keep it (0) so that a model "
                            "trained on one set is held out from another set's test split")
    synth.add_argument("--workers", type=int, help="rendering processes (default: one per core)")
    synth.set_defaults(func=_data)

    model = sub.add_parser("model", help="make model checkpoints")
    model_sub = model.add_subparsers(dest="action", required=True)
    init = model_sub.add_parser("init", help="write a randomly initialised checkpoint")
    init.add_argument("--preset", default="tiny")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_model)
    export = model_sub.add_parser("export", help="copy a checkpoint with its weights in a smaller dtype")
    export.add_argument("checkpoint", type=Path, help="checkpoint folder (e.g. runs/tiny/checkpoint)")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
