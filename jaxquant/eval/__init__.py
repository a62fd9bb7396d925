"""Evaluation: model-agnostic perplexity over fixed token windows. See docs/data.md."""

from jaxquant.eval.perplexity import PerplexityResult, eval_windows, make_loss_fn, perplexity, token_nll

__all__ = ["PerplexityResult", "eval_windows", "make_loss_fn", "perplexity", "token_nll"]
