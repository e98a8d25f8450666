"""The config of where the teachers run: one in-process or served teacher, or several routed per prompt.

``check_teachers`` is the cross-section check (exactly one way of naming the teacher, what a served or several
teachers can score), run by ``TrainConfig`` at load.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eopd.config.fields import _help, require
from eopd.config.sections import looks_local

if TYPE_CHECKING:
    from eopd.config.train import TrainConfig


@dataclass
class TeacherConfig:
    """Where the teacher runs: in-process (``models.teacher``) or behind servers (``url``: ``vllm serve MODEL
    --max-logprobs 20``, ``python -m sglang.launch_server --model-path MODEL`` or ``eopd serve-teacher MODEL``;
    docs/served_teacher.md). With several teachers (``teachers``) these are every served teacher's defaults."""

    url: str | list[str] | None = field(default=None, metadata=_help(
        "served teacher: base URL(s) ending in /v1, e.g. http://host:8000/v1; a list (or comma-separated) spreads "
        "requests over servers. Unset: models.teacher is loaded in-process"))
    model: str | None = field(default=None, metadata=_help("model name sent to the server (default: the first "
                                                           "GET /v1/models lists)"))
    api: str = field(default="auto", metadata=_help(
        "the servers' scoring API: vllm (POST /v1/completions with prompt_logprobs: vLLM, eopd serve-teacher) | "
        "sglang (POST /generate with logprob_start_len: SGLang, eopd serve-teacher --api sglang) | auto (found "
        "at connect: SGLang by GET /v1/models' owned_by, or when the completions API answers without prompt "
        "log-probs)"))
    entropy: str = field(default="auto", metadata=_help(
        "gate entropy: auto (exact when available: in-process, or a server that sends prompt_entropies; else the "
        "top-k estimate) | exact (required) | topk (estimate from top_logprobs alone, also in-process)"))
    top_logprobs: int = field(default=20, metadata=_help("top-k log-probs the top-k entropy estimate reads "
                                                         "(vLLM's default --max-logprobs is 20)"))
    timeout_s: float = field(default=120.0, metadata=_help("deadline of one scoring request, seconds"))
    retries: int = field(default=3, metadata=_help("further attempts after a failed request (next server, "
                                                   "exponential backoff)"))
    backoff_s: float = field(default=1.0, metadata=_help("wait before the first retry (doubled each retry)"))
    max_in_flight: int = field(default=4, metadata=_help("scoring requests in flight at once (one per micro-batch)"))
    check_tokenizer: bool = field(default=True, metadata=_help(
        "at start, compare the server's /tokenize ids for a probe text with the local tokenizer's"))

    def __post_init__(self) -> None:
        require(self.entropy in ("auto", "exact", "topk"), "teacher.entropy",
                 f"must be auto, exact or topk, got {self.entropy!r}")
        require(self.api in TEACHER_APIS, "teacher.api", f"must be auto, vllm or sglang, got {self.api!r}")
        require(self.top_logprobs >= 1, "teacher.top_logprobs", f"must be >= 1, got {self.top_logprobs}")
        require(self.timeout_s > 0, "teacher.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.retries >= 0, "teacher.retries", f"must be >= 0, got {self.retries}")
        require(self.backoff_s >= 0, "teacher.backoff_s", f"must be >= 0, got {self.backoff_s}")
        require(self.max_in_flight >= 1, "teacher.max_in_flight", f"must be >= 1, got {self.max_in_flight}")
        self.urls  # noqa: B018 (checks every URL)

    @property
    def urls(self) -> list[str]:
        """The server URLs (empty: in-process teacher)."""
        return _urls(self.url, "teacher.url")


def _is_http_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


#: ``teacher.api`` values (``eopd.teachers.wire.APIS``; here, where the config is checked).
TEACHER_APIS = ("auto", "vllm", "sglang")


#: What a teacher's name may hold: it becomes a metric key (``teacher/NAME/loss``) and a routing value.
TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _urls(value: str | list[str] | None, key: str) -> list[str]:
    """Server URLs from a string (comma-separated) or a list of strings; empty when unset."""
    items = value if isinstance(value, list) else [value] if value else []
    items = [part for item in items for part in (item.split(",") if isinstance(item, str) else [item])]
    require(all(isinstance(u, str) for u in items), key, f"must be URL strings, got {value!r}")
    urls = [u.strip() for u in items if u.strip()]
    for url in urls:
        require(_is_http_url(url), key, f"must be http(s)://host:port/v1 URLs, got {url!r}")
    return urls


@dataclass
class TeacherSpec:
    """One of several teachers (``teachers.NAME``; docs/multi_teacher.md): in-process (``model``) or served
    (``url``), with its own gate settings where they differ from the run's (``loss.tau``, ``loss.top_k``)."""

    model: str | None = field(default=None, metadata=_help(
        "in-process: the teacher's folder or Hub id; served (with url): the model name sent (default: the first "
        "the server lists)"))
    url: str | list[str] | None = field(default=None, metadata=_help(
        "served: base URL(s) ending in /v1 (a list or comma-separated spreads requests over servers); unset: model "
        "is loaded in-process"))
    api: str | None = field(default=None, metadata=_help("served: auto | vllm | sglang (default: teacher.api)"))
    tau: float | None = field(default=None, metadata=_help("this teacher's entropy threshold (default: loss.tau)"))
    top_k: int | None = field(default=None, metadata=_help("this teacher's top-k (default: loss.top_k)"))
    entropy: str | None = field(default=None, metadata=_help("auto | exact | topk (default: teacher.entropy)"))
    top_logprobs: int | None = field(default=None, metadata=_help(
        "top-k the top-k entropy estimate reads (default: teacher.top_logprobs)"))

    def __post_init__(self) -> None:
        require(bool(self.model) or bool(self.url), "model", "or url is required: the teacher's folder or Hub id "
                "(in-process), or its server's URL (served)")
        self.url = _urls(self.url, "url") or None
        require(self.api is None or self.api in TEACHER_APIS, "api", f"must be auto, vllm or sglang, got {self.api!r}")
        require(self.tau is None or self.tau >= 0, "tau", f"must be >= 0 (nats), got {self.tau}")
        require(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        require(self.entropy is None or self.entropy in ("auto", "exact", "topk"), "entropy",
                f"must be auto, exact or topk, got {self.entropy!r}")
        require(self.top_logprobs is None or self.top_logprobs >= 1, "top_logprobs",
                f"must be >= 1, got {self.top_logprobs}")
        if self.url is None and self.model is not None and looks_local(self.model):
            require(pathlib.Path(self.model).expanduser().is_dir(), "model",
                    f"folder {self.model!r} does not exist; give a save_pretrained folder or a Hub id")


@dataclass
class RoutingConfig:
    """Which of several teachers scores a prompt (docs/multi_teacher.md); decided once per prompt."""

    by: str = field(default="field", metadata=_help(
        "field: a field of the prompt's row (data.task jsonl/hf keep each row's short scalar fields; math keeps "
        "benchmark, the data source, subject, level) | hash: a stable hash of the prompt id, equal shares over the "
        "teachers in the order listed"))
    field: str = field(default="teacher", metadata=_help("by=field: the row field read"))
    # ``dataclasses.field``: the attribute ``field`` above hides the function in this class body
    map: dict[str, str] = dataclasses.field(default_factory=dict, metadata=_help(
        "by=field: {field value: teacher name}; empty: the value is the teacher's name"))
    default: str | None = dataclasses.field(default=None, metadata=_help(
        "the teacher of prompts whose value is not mapped (or lack the field); unset: such a prompt stops the run "
        "at its first step, with one line naming it"))

    def __post_init__(self) -> None:
        require(self.by in ("field", "hash"), "routing.by", f"must be field or hash, got {self.by!r}")
        require(bool(self.field.strip()), "routing.field", "is empty; name the row field that picks the teacher")
        self.map = {_route_key(k): v for k, v in self.map.items()}


def _route_key(value: Any) -> str:
    """A ``routing.map`` key as the router compares it (YAML may read ``1`` or ``true`` as non-strings)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_teachers(cfg: TrainConfig) -> None:
    """Where the teachers are and what they can score: ``models.teacher``, ``teacher.url`` or ``teachers``
    (exactly one way), a served teacher's limits (temperature 1, top-k only), several teachers' (top-k
    objectives, a fixed tau) and a routing rule that names them."""
    served = bool(cfg.teacher.urls) or any(spec.url for spec in cfg.teachers.values())
    if cfg.teachers:
        require(not cfg.teacher.urls, "teacher.url", "give each teacher's url under teachers.NAME.url, not both")
        for name in cfg.teachers:
            require(TEACHER_NAME.fullmatch(name) is not None, f"teachers.{name}",
                    "a teacher's name may hold letters, digits, '_', '-' and '.' only (it names its metrics)")
        obj = cfg.objective_config()
        require(not obj.needs_teacher_logits, "objective",
                f"{cfg.objective!r} reads the teacher's full distribution; with several teachers only top-k "
                "objectives (eopd, opd, ...) are supported")
        require(obj.adaptive_share is None, "loss.adaptive_share",
                "an adaptive tau is not supported with several teachers (each has its own entropy scale): give "
                "each its tau (teachers.NAME.tau)")
        names = sorted(cfg.teachers)
        for value, name in cfg.routing.map.items():
            require(name in cfg.teachers, "routing.map", f"{value!r} -> {name!r} names no teacher (teachers: "
                    f"{', '.join(names)})")
        require(cfg.routing.default is None or cfg.routing.default in cfg.teachers, "routing.default",
                f"{cfg.routing.default!r} names no teacher (teachers: {', '.join(names)})")
    else:
        require(bool(cfg.models.teacher) or bool(cfg.teacher.urls), "models.teacher",
                "is required (a local folder or a Hub id), unless teacher.url or a teachers section names the teacher")
    if not served:
        return
    require(cfg.rollout.temperature == 1, "rollout.temperature",
            f"must be 1 with a served teacher (teacher.url), got {cfg.rollout.temperature}: served log-probs are "
            "the temperature-1 teacher's and cannot be moved to another temperature from the top-k alone")
    require(not cfg.objective_config().needs_teacher_logits, "objective",
            f"{cfg.objective!r} reads the teacher's full distribution, which a served teacher (teacher.url) does "
            "not return; use a top-k objective (eopd, opd, ...) or an in-process teacher")

