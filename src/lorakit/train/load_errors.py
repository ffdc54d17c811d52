"""What transformers raises for damaged or wrong model files, and the first line of such an error."""

from __future__ import annotations

import pickle

from safetensors import SafetensorError


# What transformers raises for damaged or wrong model files: a truncated safetensors, a config that is not an
# object, a pickle refused by weights_only, a shape that does not fit.
def _load_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
                                               EOFError, pickle.UnpicklingError, SafetensorError)
    try:  # transformers >= 5 checks config field types through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:
        pass
    return errors


LOAD_ERRORS = _load_errors()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__
