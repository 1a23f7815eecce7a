"""Joint training: the upper bound.

One session holding every class, trained on the whole training set with all its labels and
evaluated with the same metrics. The protocol of the config is ignored apart from its name.
"""

from __future__ import annotations

from mlcil.methods.finetune import Finetune
from mlcil.methods.registry import register_method


@register_method
class Joint(Finetune):
    name = "joint"
    single_session = True
