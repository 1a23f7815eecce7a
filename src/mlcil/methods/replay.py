"""Experience replay (ER): fine-tuning on the session's images plus herded exemplars.

The engine adds the exemplar memory to every session's training set for any method; what makes
this method is that it requires the memory and adds nothing else (no distillation).
"""

from __future__ import annotations

from mlcil.methods.finetune import Finetune
from mlcil.methods.registry import register_method


@register_method
class Replay(Finetune):
    name = "replay"
    needs_memory = True
