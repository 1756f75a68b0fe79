"""The one training engine: every training-based rewrite (``finetune``, ``convert --recover``, hybrid distillation,
MoE/BAM router training, SinkLoRA) runs here. No other module has a training loop.

Pieces (import them from their modules; nothing here imports torch at package import):

- :mod:`seqtool.train.data` — ``build_data(tokenizer, DataConfig(source, seq_len, heldout, seed, mix_retrieval,
  max_train_tokens), cache_dir) -> PackedData``: documents from a text file / directory / JSONL / ``save_to_disk``
  directory / local HF cache dataset / the built-in corpus (default), tokenised once (cached), packed into
  ``seq_len`` rows with document separators, a seeded held-out split. ``PackedData.step_rows(step, micro, batch,
  grad_accum, seed)`` gives the rows of a step, identical on every process and after a resume.
- :mod:`seqtool.train.kinds` — the module-kind vocabulary (``attention, mlp, embed, norm``):
  ``register_kind(name)(fn(model, spec) -> [qualified module names])`` adds a kind (``mixer``, ``router``,
  ``experts`` ...); ``kind_modules(model, kinds)``, ``lora_plan(model, kinds)``.
- :mod:`seqtool.train.trainable` — ``prepare(model, method="lora"|"full", kinds, LoraOptions) -> model to train``,
  ``merge(model) -> plain model`` (LoRA folded in), ``save_adapter(peft_model, dir)``.
- :mod:`seqtool.train.objectives` — ``Objective`` (subclass: ``name``, ``needs_teacher``, ``attach``/``detach``
  for hooks, ``__call__(StepContext) -> scalar``, normalised with ``ctx.token_scale`` / ``ctx.micro_scale``);
  built-ins ``LMLoss``, ``KLDistill(temperature, top_k)``, ``ModuleMatch(module_names)``, ``AuxLoss(fn, names)``
  and ``emit_aux_loss(name, tensor)`` for modules (routers) to report terms during the forward.
- :mod:`seqtool.train.loop` — ``Trainer(model, data, objectives, TrainConfig(...), teacher=, run_dir=, resume=,
  identity=, dist=, layers=, callbacks=).run(max_steps=None) -> TrainOutcome``: AdamW, warmup + cosine, grad
  accumulation, clipping, bf16 autocast on GPU, gradient checkpointing, atomic resumable checkpoints,
  ``log.jsonl``, progress, ``loss.png``. ``data`` is any batch source with ``micro_batches(step, grad_accum,
  batch, seed) -> [{"input_ids", "labels", ...extra tensors}]``, ``heldout`` (rows or None) and ``fingerprint``
  (``PackedData`` is one; ``seqtool.zoo.train_ref.RefBatches`` is a curriculum); extras reach objectives as
  ``ctx.batch``. ``callbacks``: ``fn(trainer, record)`` after every step (extra evals, logging).
- :mod:`seqtool.train.dist` — ``torchrun`` / ``accelerate launch``: ``init(mode)``, FSDP2 ``fully_shard`` per
  decoder layer or DDP, rank 0 gathers and saves.
- :mod:`seqtool.train.finetune` — ``finetune(model, steps=, data=, output=, method=, train=, loss=, teacher=, ...)
  -> FinetuneResult`` (public as ``seqtool.finetune``) and ``run_training(model, tokenizer, data=, config=, ...)
  -> TrainingRun``, the in-memory core conversions call.

Training-time attention functions (a linear-attention or sparse kernel used while training) are registered the
way every seqtool attention is — ``transformers.AttentionInterface.register(name, fn)`` plus a mask function
(see ``seqtool/patches``) — and selected on the model before it is handed to the trainer
(``model.set_attn_implementation(name)``); the loop only calls ``model(input_ids=...)``.
"""
