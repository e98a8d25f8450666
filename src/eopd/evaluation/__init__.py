"""Evaluation: the one loop behind ``eopd eval`` and the trainer's periodic evaluation.

- ``loop``        sample and grade (last ``\\boxed{}`` by math-verify), one process or several
- ``results``     the graded records, Avg@k and unbiased pass@k, paths, entropy per role, the results files
- ``backends``    the samplers it runs on (our KV-cache sampler, or vLLM's engine when installed)
- ``comparison``  the paired bootstrap between two results files (``eopd eval --compare``)
"""

from eopd.evaluation.comparison import compare_results, load_results, paired_bootstrap
from eopd.evaluation.loop import evaluate_across_processes, evaluate_problems, names_paths
from eopd.evaluation.results import pass_at_k, result_from_records, write_results

__all__ = [
    "compare_results", "evaluate_across_processes", "evaluate_problems", "load_results", "names_paths",
    "paired_bootstrap", "pass_at_k", "result_from_records", "write_results",
]
