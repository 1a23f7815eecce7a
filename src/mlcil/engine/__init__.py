"""The training engine: the session loop, fitting a session, observers, evaluation, checkpoints.

Modules: ``loop`` (``Trainer``), ``fit`` (one session's epochs), ``observers`` (logs, progress,
TensorBoard), ``evaluate`` (scores, session results, ``evaluate_run``), ``checkpoint`` (run state,
atomic checkpoints, ``restore_run``). Import from those modules; this package imports none of them
so that importing one engine module never drags in the rest.
"""
