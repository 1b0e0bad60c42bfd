"""The execution engine: the only code that knows about pipes, signals and threads.

::

    caller thread                 manager thread                 worker (process or thread)
    -------------                 --------------                 --------------------------
    jobs.run_batches ──Chunk──▶ pending deque ──dispatch──▶ task pipe ─▶ run fn over items
        ▲                         │   ▲                                     │
        │                 deadlines, deaths,                               │
        └──── sink(chunk, outcome) ◀── result pipe ◀── ChunkResult ◀───────┘

``jobs`` cuts input into chunks and puts results back in order; ``dispatcher`` owns
all mutable engine state in one manager thread; ``process`` and ``threads`` are its two
transports; ``serialization`` and ``protocol`` say how things cross a process boundary.
"""
