"""``eopd serve-teacher MODEL --port P``: serve a Hugging Face teacher behind vLLM's completions API.

The server (``eopd.teacher_server``) answers the requests ``teacher.url`` sends (token-id prompts with
``prompt_logprobs=k``) and adds the exact entropy at every position (``--no-entropy`` leaves it out, so the
trainer falls back to the top-k gate, as with vLLM)::

    eopd serve-teacher Qwen/Qwen3-8B --port 8000 --host 0.0.0.0 --dtype bfloat16
    eopd train configs/run.yaml teacher.url=http://teacher-host:8000/v1

``--port 0`` takes a free port. The first line on stdout says where it listens (tests wait for it). A model
that cannot be loaded ends with one line and exit code 2; Ctrl-C stops the server (exit 130).
"""

from __future__ import annotations

import argparse

from eopd.commands import run_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eopd serve-teacher",
                                description="Serve a teacher model behind vLLM's OpenAI-compatible completions API "
                                "(prompt_logprobs) plus its exact entropies, for teacher.url.")
    p.add_argument("model", help="model folder or Hub id (safetensors)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: a free one, printed at start)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--top-k-max", type=int, default=20, help="largest prompt_logprobs accepted (vLLM's --max-logprobs)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    p.add_argument("--served-model-name", help="name clients use (default: MODEL as given)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--no-entropy", action="store_true",
                   help="do not send prompt_entropies (answer like vLLM: the client uses the top-k gate)")
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: list[str]) -> int:
    """Run ``eopd serve-teacher``; returns the exit code (2 on bad input, 130 on Ctrl-C)."""
    args = _parser().parse_args(argv)

    def body() -> int:
        import torch
        from transformers.utils import logging as hf_logging

        from eopd.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
        from eopd.teacher_server import TeacherHTTPServer, TeacherService

        hf_logging.disable_progress_bar()
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        device = resolve_device(args.device)
        model = load_causal_lm(args.model, device=device, dtype=resolve_dtype(args.dtype, device),
                               trust_remote_code=args.trust_remote_code).requires_grad_(False)
        tokenizer = load_tokenizer(args.tokenizer or args.model, args.trust_remote_code)
        name = args.served_model_name or args.model
        service = TeacherService(model, tokenizer, name=name, top_k_max=args.top_k_max,
                                 send_entropy=not args.no_entropy, micro_batch_size=args.micro_batch_size)
        with TeacherHTTPServer((args.host, args.port), service, verbose=args.verbose) as server:
            host, port = server.server_address[:2]
            print(f"eopd serve-teacher: serving {name} on http://{host}:{port}/v1 (prompt_logprobs <= "
                  f"{args.top_k_max}, exact entropies: {'no' if args.no_entropy else 'yes'})", flush=True)
            server.serve_forever()
        return 0

    return run_command("eopd serve-teacher", body, also=(OSError,))
