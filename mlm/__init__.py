"""mlm: masked-language-model domain adaptation of DistilBERT in plain PyTorch."""

from mlm.errors import MLMError

__all__ = ["MLMError"]
__version__ = "0.1.0"
