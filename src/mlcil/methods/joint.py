"""Joint training: the upper bound.

One session holding every class, trained on the whole training set with all its labels and
evaluated with the same metrics. The protocol of the config is ignored apart from its name.
"""

from __future__ import annotations

from typing import ClassVar

from mlcil.methods.base import MethodParams
from mlcil.methods.finetune import Finetune
from mlcil.methods.registry import register_method
from mlcil.old_classes import OLD_CLASS_RULES

_NO_OLD_CLASSES = "joint training learns every class in one session: there are no old classes"


class JointParams(MethodParams):
    refused_old_classes: ClassVar[dict[str, str]] = {
        rule: _NO_OLD_CLASSES for rule in OLD_CLASS_RULES if rule != "negative"
    }


@register_method
class Joint(Finetune):
    name = "joint"
    Params = JointParams
    single_session = True
