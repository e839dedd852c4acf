"""Training: one loop (``trainer``) for every stage (``tokenizer``, ``lm``, ``detokenizer``).

``task`` (the Task interface and TrainState), ``checkpoints`` (Orbax, resume, corrupt-step fallback),
``metrics`` (metrics.jsonl, TensorBoard, console, MFU); one module per stage.
"""
