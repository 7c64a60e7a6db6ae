"""The `kvflow` command: generate | serve | chat | bench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kvflow.config import EngineArgs
from kvflow.logger import configure_logging, resolve_level


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    parser.add_argument("--stop", action="append", default=None)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvflow.engine.llm import LLM
    from kvflow.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items()})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed,
                            stop=args.stop)
    outputs = (llm.chat([{"role": "user", "content": p} for p in args.prompt][:1], params,
                        use_tqdm=False)
               if args.chat else llm.generate(list(args.prompt), params, use_tqdm=False))
    for out in outputs:
        text = out.outputs[0].text
        print(text if args.chat else (out.prompt or "") + text)
        print("-" * 40, file=sys.stderr)
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for prompts with the offline engine")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--model", default=None, help="model (default: the packaged default)")
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt")
    add_verbose_arg(p)
    _add_sampling_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_generate)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    """An interactive command: logs at WARNING unless --verbose (or the env) asks for more."""
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the engine's log lines (INFO) on stderr")
    parser.set_defaults(default_log_level="WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflow", description=__doc__)
    parser.add_argument("--log-level", default=None, help=(
        "DEBUG, INFO, WARNING, ERROR (default: $KVFLOW_LOGGING_LEVEL, else INFO for serve "
        "and WARNING for chat and generate)"))
    sub = parser.add_subparsers(dest="command", required=True)
    from kvflow.entrypoints.cli_serve import add_parsers

    builders: list[Callable[[argparse._SubParsersAction], None]] = [_generate_parser]
    builders.extend(add_parsers())
    for build in builders:
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = args.log_level or ("INFO" if getattr(args, "verbose", False) else None)
    try:
        level = resolve_level(explicit, getattr(args, "default_log_level", "INFO"))
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(level)
    args.log_level = level  # the resolved level, for what the command starts (uvicorn)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
