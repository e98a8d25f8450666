"""``eopd serve-teacher MODEL --port P``: serve a Hugging Face teacher behind vLLM's completions API (or SGLang's).

The server (``eopd.teachers.server``) answers the requests ``teacher.url`` sends (token-id prompts with
``prompt_logprobs=k``; with ``--api sglang`` SGLang's ``/generate`` with ``logprob_start_len``) and adds the exact
entropy at every position (``--no-entropy`` leaves it out, so the trainer falls back to the top-k gate, as with
vLLM or SGLang)::

    export EOPD_TEACHER_API_KEY=...        # on both machines; the server requires it, the client sends it
    eopd serve-teacher Qwen/Qwen3-8B --port 8000 --host 0.0.0.0 --dtype bfloat16
    eopd train configs/run.yaml teacher.url=http://teacher-host:8000/v1

With a key (``EOPD_TEACHER_API_KEY``, or ``--api-key``, which wins, as ``--api-key`` wins over vLLM's
``VLLM_API_KEY``) every endpoint but ``/health`` answers 401 without it. Without a key the server listens on
loopback addresses only, unless ``--allow-no-auth`` says the network is trusted. ``--port 0`` takes a free port.
The first line on stdout says where it listens (tests wait for it). Every argument is checked before the model
loads; bad input ends with one line and exit code 2; Ctrl-C stops the server (exit 130).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket

from eopd.commands import run_command
from eopd.commands.arguments import DTYPE_CHOICES, CommandParser, UsageError, count, device, nonempty, port
from eopd.teachers import API_KEY_ENV
from eopd.teachers import api_key as api_key_from_env


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="eopd serve-teacher",
                      description="Serve a teacher model behind vLLM's OpenAI-compatible completions API "
                      "(prompt_logprobs), or SGLang's /generate (--api sglang), plus its exact entropies, for "
                      "teacher.url.")
    p.add_argument("model", type=nonempty, help="model folder or Hub id (safetensors)")
    p.add_argument("--port", type=port, required=True, help="port to listen on, 0..65535 (0: a free one, printed "
                   "at start)")
    p.add_argument("--host", type=nonempty, default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for all, which needs an API key)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (as vllm serve "
                   f"--api-key). Prefer the environment variable {API_KEY_ENV}: a key on the command line is "
                   "visible in shell history and to other users (ps); the client reads the same variable")
    p.add_argument("--allow-no-auth", action="store_true",
                   help="listen beyond this machine without an API key (only on a network you trust)")
    p.add_argument("--top-k-max", type=count, default=20,
                   help="largest prompt_logprobs accepted, >= 1 (vLLM's --max-logprobs)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto (bf16 on GPU, fp32 on CPU) | "
                   "float32 | bfloat16 | float16")
    p.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tokenizer", type=nonempty, help="tokenizer folder or Hub id (default: the model's)")
    p.add_argument("--served-model-name", type=nonempty, help="name clients use (default: MODEL as given)")
    p.add_argument("--micro-batch-size", type=count, default=8, help="sequences per forward, >= 1")
    p.add_argument("--max-request-mb", type=count, default=64,
                   help="largest request body in MiB (413 above it; 8 sequences of 32k tokens are ~2 MiB)")
    p.add_argument("--max-batch-tokens", type=count,
                   help="largest request in padded positions (prompts x longest prompt; 400 above it); default: "
                   "the larger of 2**21 and 8 full-length sequences")
    p.add_argument("--api", choices=("vllm", "sglang"), default="vllm",
                   help="whose shapes to answer in: vllm (POST /v1/completions with prompt_logprobs) | sglang "
                   "(POST /generate with logprob_start_len; /v1/completions then ignores prompt_logprobs, as "
                   "SGLang's does)")
    p.add_argument("--max-model-len", type=count,
                   help="longest sequence accepted, listed in GET /v1/models (vLLM's --max-model-len, SGLang's "
                   "--context-length; default: the model config's max_position_embeddings)")
    p.add_argument("--no-entropy", action="store_true",
                   help="do not send prompt_entropies (answer like vLLM: the client uses the top-k gate)")
    p.add_argument("--num-threads", type=count, help="torch CPU threads, >= 1 (default: torch's)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code from its folder or the Hub (off: only transformers' code)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's loopback (``""`` means every interface).

    Raises:
        UsageError: ``host`` resolves to nothing.
    """
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as err:
        raise UsageError(f"--host {host!r} does not resolve ({err.strerror or err}); give an address of this "
                         "machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def api_key(args: argparse.Namespace) -> str | None:
    """The key the server requires: ``--api-key``, else ``EOPD_TEACHER_API_KEY``, else None; checked that a
    server reachable from other machines has one unless ``--allow-no-auth``.

    Raises:
        UsageError: an empty ``--api-key``, or a non-loopback ``--host`` without a key or ``--allow-no-auth``.
        TeacherMismatchError: ``EOPD_TEACHER_API_KEY`` holds a character a header cannot carry.
    """
    if args.api_key is None:
        key = api_key_from_env()  # stripped and checked as the client reads it
    else:
        key = args.api_key.strip()
        if not key:
            raise UsageError(f"--api-key is empty; give the key (or set {API_KEY_ENV}), or leave both out")
        if not (key.isascii() and key.isprintable()):
            raise UsageError("--api-key holds a character an HTTP header cannot carry; give the key alone")
    if key is None and not args.allow_no_auth and not is_loopback(args.host):
        where = f"port {args.port}" if args.port else "its port"
        raise UsageError(f"--host {args.host} accepts connections from other machines, and without an API key "
                         f"anyone who can reach {where} can use this teacher: set {API_KEY_ENV} (here and where "
                         "eopd train runs), or pass --allow-no-auth on a network you trust")
    return key


def main(argv: list[str]) -> int:
    """Run ``eopd serve-teacher``; returns the exit code (2 on bad input, 130 on Ctrl-C)."""
    args = _parser().parse_args(argv)

    def body() -> int:
        key = api_key(args)  # before the model loads: a refusal takes no minutes
        import torch
        from transformers.utils import logging as hf_logging

        from eopd.models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
        from eopd.teachers import TeacherHTTPServer, TeacherService

        hf_logging.disable_progress_bar()
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        device_ = resolve_device(args.device)
        model = load_causal_lm(args.model, device=device_, dtype=resolve_dtype(args.dtype, device_),
                               trust_remote_code=args.trust_remote_code).requires_grad_(False)
        tokenizer = load_tokenizer(args.tokenizer or args.model, args.trust_remote_code)
        name = args.served_model_name or args.model
        service = TeacherService(model, tokenizer, name=name, top_k_max=args.top_k_max,
                                 send_entropy=not args.no_entropy, micro_batch_size=args.micro_batch_size,
                                 max_batch_tokens=args.max_batch_tokens, max_model_len=args.max_model_len,
                                 api=args.api)
        with TeacherHTTPServer((args.host, args.port), service, verbose=args.verbose, api_key=key,
                               max_body_bytes=args.max_request_mb << 20) as server:
            host, bound = server.server_address[:2]
            print(f"eopd serve-teacher: serving {name} on http://{host}:{bound}/v1 ({args.api} API, top-k <= "
                  f"{args.top_k_max}, exact entropies: {'no' if args.no_entropy else 'yes'}, API key: "
                  f"{'required' if key else 'none'})", flush=True)
            server.serve_forever()
        return 0

    return run_command("eopd serve-teacher", body, also=(OSError,))
