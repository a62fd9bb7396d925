"""Evaluation: model-agnostic perplexity over fixed token windows. See docs/data.md."""

from jaxquant.eval.perplexity import (
    PerplexityResult,
    chunked_token_nll,
    eval_windows,
    make_loss_fn,
    perplexity,
    token_nll,
)

__all__ = ["PerplexityResult", "chunked_token_nll", "eval_windows", "make_loss_fn", "perplexity", "token_nll"]
