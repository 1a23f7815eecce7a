"""The training engine: the session loop, fitting a session, observers, evaluation, checkpoints.

Modules: ``inputs`` (what the engine receives: the frozen data view, the runtime, the method
factory), ``loop`` (``Trainer``), ``fit`` (one session's epochs), ``callbacks`` (the one
vocabulary of hooks into a run), ``observers`` (the built-in callbacks: logs, progress, the
tracking callback, phase timers), ``evaluate`` (scores,
herding features, session results), ``checkpoint`` (run state, atomic checkpoints,
``restore_run``). The engine imports no feature built on it (pretraining, added sessions,
diagnostics, the API, prediction, the CLI). Import from those modules; this package imports
none of them so that importing one engine module never drags in the rest.
"""
