"""`make demo`: make a tiny model if none is given, start the whole system, stream a completion, stop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.client import Client, ServerError
from shared.config import positive_int
from shared.launcher import RunningSystem
from shared.make_model import make_model

DEFAULT_MODEL = Path("models/demo-tiny-qwen3moe.gguf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve demo", description=__doc__)
    parser.add_argument("--model", help="GGUF model to serve (default: a generated tiny qwen3moe)")
    parser.add_argument("--prompt", default="The expert hosts of a mixture of experts")
    parser.add_argument("--max-tokens", type=positive_int, default=48)
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not args.model and not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        stats = make_model(model, arch="qwen3moe", preset="tiny", dtype="f32", seed=0, routing_skew=0.8)
        print(f"made {model} ({stats.bytes / 1e6:.1f} MB)")
    print(f"starting tierserve on {model} (coordinator, gpu worker, 2 expert hosts)...", flush=True)
    try:
        system = RunningSystem(str(model), "--expert-hosts", "2", "--hot-experts", "2")
    except RuntimeError as e:  # why is in the system's own lines above
        print(f"tierserve demo: {e}", file=sys.stderr)
        return 1
    with system:
        print(f"ready at {system.endpoint}\n\n{args.prompt}", end="", flush=True)
        with Client(system.endpoint) as client:
            final = None
            try:
                for event in client.generate(prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.8,
                                             top_p=0.95, seed=0):
                    if event.KIND == "token":
                        print(event.text, end="", flush=True)
                    else:
                        final = event
            except ServerError as e:  # a prompt longer than the context, say: the system's answer, then its stop
                print(f"\ntierserve demo: {e}\nstopping...", file=sys.stderr, flush=True)
                return 1
        print(f"\n\n[{final.completion_tokens} tokens, {final.finish_reason}; time to first token "
              f"{final.ttft_s * 1000:.0f} ms, {final.decode_tok_s:.1f} tok/s]\nstopping...", flush=True)
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
