"""The training engine: the session loop, fitting a session, observers, evaluation, checkpoints.

Modules: ``loop`` (``Trainer``), ``fit`` (one session's epochs), ``observers`` (logs, progress,
TensorBoard), ``callbacks`` (how features above the engine join a run), ``evaluate`` (scores,
herding features, session results), ``checkpoint`` (run state, atomic checkpoints,
``restore_run``). The engine imports no feature built on it (pretraining, added sessions,
diagnostics, the API, prediction, the CLI). Import from those modules; this package imports
none of them so that importing one engine module never drags in the rest.
"""
