"""Every config field of jaxddp, with its default and meaning.

`jaxddp.get_config()` returns this config; configs/default.py re-exports it, and the
dataset and recipe configs under configs/ start from it and override fields. Values
that follow from others (steps per epoch, total steps, warmup steps, per-device
batch) are computed in code (jaxddp/config.py) so that command-line overrides such as
--config.train.batch_size=512 rescale everything that depends on them.

Names (dataset.name, model.name, model.norm, optimizer.name, optimizer.schedule,
train.loss, sparsity.method) are looked up in registries: an unknown name is an error
that lists the valid ones.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Seed (an integer >= 0) for parameter initialisation, the training order of the
  # data and the random streams of the training step (dropout).
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  # mnist1d, digits, synthetic (embedded, no download); npz (your arrays, from
  # `path`); image_folder (data_dir/<split>/<class>/<image>, through
  # tfds.ImageFolder); the name of any tfds image classification dataset prepared
  # under data_dir, e.g. cifar10 or imagenet2012 (see README, "Real data"); or an
  # import path package.module:factory of a function (config) -> Dataset (see
  # README, "Your own model and data"). jaxddp never downloads.
  config.dataset.name = "mnist1d"
  # npz only: a file holding the arrays x_train, y_train, x_test, y_test (inputs
  # channels last, integer labels), e.g. written by numpy.savez.
  config.dataset.path = ""
  # tfds and image_folder only. Where the prepared tfds data is ('' = tfds's
  # default, $TFDS_DATA_DIR or ~/tensorflow_datasets), or the image folder.
  config.dataset.data_dir = ""
  # Splits to train and to evaluate on ('' = validation for imagenet2012, whose test
  # split has no labels; else test if the dataset has one, else validation). tfds
  # sub-split syntax works, e.g. "train[:90%]".
  config.dataset.train_split = "train"
  config.dataset.eval_split = ""
  # auto, inception (random-resized crop and flip for training; resize to
  # image_size / 0.875 and central crop for evaluation), cifar (4-pixel padded
  # random crop and flip; evaluation unchanged) or none. auto: cifar for
  # cifar10/cifar100, none for other fixed-size images, else inception. Pixels
  # are then normalised per channel (the dataset's statistics, else ImageNet's).
  config.dataset.preprocess = "auto"
  # inception only: side of the square training and evaluation images (0 = 224).
  config.dataset.image_size = 0
  # Examples in each process's shuffle buffer (the order within an epoch).
  config.dataset.shuffle_buffer = 16384
  # Keep the encoded examples in memory after the first epoch (small datasets).
  config.dataset.cache = False
  # Training-time augmentation of embedded 1-D signals: random circular shift of
  # up to this many positions (0 disables it).
  config.dataset.max_shift = 0
  # mnist1d only: the number of training examples (0 = the standard 4000). More
  # than 4000 adds freshly generated examples (cached); the test set stays the
  # standard 1000.
  config.dataset.num_train_examples = 0
  # Only for name=synthetic: shape of one example (channels last), number of
  # classes, and the number of train and test examples.
  config.dataset.synthetic_shape = (32, 32, 3)
  config.dataset.synthetic_num_classes = 10
  config.dataset.synthetic_train_size = 4096
  config.dataset.synthetic_test_size = 1024

  config.model = ml_collections.ConfigDict()
  # One of: cnn, resnet18, resnet34, resnet50, resnet101, resnet152 (ResNet v1.5),
  # vit_ti, vit_s, vit_b (Vision Transformers); every one works on 1-D signals
  # (N, L, C) and 2-D images (N, H, W, C). Or an import path package.module:attribute
  # of a Flax module class (built with num_classes=) or of a factory
  # (config, num_classes) -> nn.Module (see README, "Your own model and data").
  config.model.name = "cnn"
  # Normalisation layer: batch_norm; ghost_batch_norm (each device's batch is
  # normalised in ghost batches of ghost_batch_size examples, Hoffer et al. 2017;
  # see jaxddp.nn.GhostBatchNorm); or none (no normalisation: a model whose output
  # for an example does not depend on the rest of its batch).
  config.model.norm = "batch_norm"
  # ghost_batch_norm only: examples per ghost batch. It must divide the per-device
  # batch (train.batch_size / devices); at or above it, ghost BN is per-device BN.
  config.model.ghost_batch_size = 32
  # batch_norm only (ghost batches never pool statistics across devices).
  # True: batch-norm statistics are computed over the global batch (synchronised
  # across devices), so 1 device and 8 devices give the same numbers.
  # False: each device normalises with its own local batch; the running averages
  # are then averaged across devices after every step.
  config.model.sync_batch_stats = True
  # Momentum of the batch-norm running averages.
  config.model.bn_momentum = 0.9
  # batch_norm only: how the batch variance is computed. two_pass: mean((x - mean)^2),
  # accurate in every channel. one_pass: E[x^2] - E[x]^2 (flax's fast variance, jaxddp's
  # formula before December 2026), which loses digits in channels whose mean is large
  # against their spread and lets 1 and 8 devices drift apart; kept to continue old runs
  # bit for bit. See docs/numerics.md. (ghost_batch_norm always uses two passes.)
  config.model.bn_variance = "two_pass"
  # CNN and ResNets: channels of the first stage; later stages double it.
  config.model.width = 64
  # ResNet stem: imagenet (7x7 stride-2 conv + max-pool), small (3x3 stride-1 conv,
  # no pool), or auto (imagenet for inputs of 64 pixels or more, else small).
  config.model.stem = "auto"
  # ResNets: start the scale of the last batch norm of every residual block at 0,
  # so each block starts as the identity (Goyal et al. 2017).
  config.model.zero_init_residual = False
  # Computation dtype of the convolutions, dense layers and normalisation outputs:
  # float32 or bfloat16 (mixed precision). Parameters, optimizer state and the
  # batch-norm running statistics stay float32 either way, and so do the logits and
  # the loss. bfloat16 is for GPUs/TPUs; on a CPU it is no faster. float16 is
  # not offered: its narrow range would need loss scaling.
  config.model.dtype = "float32"
  # Vision Transformers: the side of a (square) patch, which must divide the input's
  # spatial sizes; pooling of the tokens for the head, cls (a class token) or mean;
  # dropout on the attention weights and each residual branch; the number of blocks
  # (0 = the variant's 12).
  config.model.patch_size = 16
  config.model.pooling = "cls"
  config.model.dropout = 0.0
  config.model.depth = 0
  config.optimizer = ml_collections.ConfigDict()
  # One of: sgd, momentum, nesterov, adamw, lars, lamb.
  config.optimizer.name = "momentum"
  # Learning rate at the reference batch size; the peak learning rate (reached
  # after warmup) is this, scaled to the effective batch by `scaling`.
  config.optimizer.learning_rate = 0.1
  # How the peak learning rate follows the effective batch B: none (unchanged),
  # linear (x B / reference_batch_size, Goyal et al. 2017) or sqrt
  # (x sqrt(B / reference_batch_size), Hoffer et al. 2017).
  config.optimizer.scaling = "none"
  config.optimizer.reference_batch_size = 256
  # Momentum of momentum/nesterov/lars, and b1 of adamw/lamb.
  config.optimizer.momentum = 0.9
  # Weight decay (L2 added to the gradient for sgd/momentum/nesterov/lars,
  # decoupled for adamw/lamb).
  config.optimizer.weight_decay = 5e-4
  # False: weight decay skips biases and normalisation parameters (every
  # parameter with fewer than 2 dimensions). LARS/LAMB trust ratios always skip them.
  config.optimizer.decay_norm_and_bias = False
  # LARS trust coefficient (eta).
  config.optimizer.trust_coefficient = 0.001
  # Clip the gradient to this global norm before the update (0 disables it).
  config.optimizer.grad_clip_norm = 0.0
  # Linear warmup from 0 to the peak learning rate over this many epochs ...
  config.optimizer.warmup_epochs = 0.0
  # ... or optimizer steps: when > 0 this overrides warmup_epochs.
  config.optimizer.warmup_steps = 0
  # Shape of the learning rate after warmup: cosine (to 0 at the end), step
  # (multiplied by decay_factor at each of decay_epochs), polynomial (to 0 at the
  # end, with polynomial_power), or constant.
  config.optimizer.schedule = "cosine"
  config.optimizer.decay_epochs = ()
  config.optimizer.decay_factor = 0.1
  config.optimizer.polynomial_power = 2.0

  # Sparse training (see README, "Sparse training", and docs/sparsity.md). With a
  # method other than none, the models' dense and convolution layers become
  # jaxddp.nn.MaskedDense / MaskedConv.
  config.sparsity = ml_collections.ConfigDict()
  # none; magnitude (prune the smallest weights once, at start_step);
  # gradual_magnitude (prune every update_every steps from start_step to end_step,
  # towards weight_sparsity on the cubic schedule of Zhu & Gupta 2017); random (a
  # random mask fixed at initialisation); swat (sparse weight activation training,
  # Raihan & Aamodt 2020: the top-K weights, recomputed every update_every steps,
  # and a sparse layer input for the kernel gradient). Pruned weights of the first
  # three methods get no update and stay exactly 0; under swat every weight trains.
  config.sparsity.method = "none"
  # Target fraction of zero weights over the masked layers.
  config.sparsity.weight_sparsity = 0.8
  # swat only: fraction of each layer's input zeroed (the smallest magnitudes) for
  # its kernel gradient; 0 turns that off.
  config.sparsity.activation_sparsity = 0.8
  # How weight_sparsity is spread over the layers: uniform (each layer gets it) or
  # erk (Erdos-Renyi-Kernel, Evci et al. 2020: larger layers sparser).
  config.sparsity.distribution = "uniform"
  # layerwise (each layer keeps its own largest weights) or global (one magnitude
  # threshold over all masked layers; needs distribution=uniform).
  config.sparsity.scope = "layerwise"
  # Keep the first layer (the stem convolution) and/or the last (the classifier)
  # dense: plain layers, no mask, no SWAT.
  config.sparsity.skip_first_layer = True
  config.sparsity.skip_last_layer = False
  # Steps of the schedule, counted in optimizer updates: pruning starts at
  # start_step; gradual_magnitude reaches weight_sparsity at end_step (0 = 3/4 of
  # the run); gradual_magnitude and swat recompute the masks every update_every steps.
  config.sparsity.start_step = 0
  config.sparsity.end_step = 0
  config.sparsity.update_every = 100

  config.train = ml_collections.ConfigDict()
  # Global batch size of one forward pass: summed over every device of every process.
  config.train.batch_size = 128
  # Gradient accumulation: each optimizer update averages the gradients of this
  # many batches, run one after another. The effective batch is batch_size x
  # accumulation_steps with the memory of batch_size; steps, epochs, learning-rate
  # scaling and schedules count effective batches.
  config.train.accumulation_steps = 1
  # Train longer (Hoffer et al. 2017): linear multiplies the epochs and the step
  # schedule's decay epochs by effective batch / reference_batch_size; none keeps them.
  config.train.epochs_scaling = "none"
  # The loss minimised and reported: cross_entropy, or an import path
  # package.module:function of loss_fn(logits, labels) -> per-example losses.
  config.train.loss = "cross_entropy"
  # Label smoothing of the training cross_entropy (0 disables it).
  config.train.label_smoothing = 0.0
  # Length of training in epochs ...
  config.train.num_epochs = 10
  # ... or in optimizer steps: when > 0 this overrides num_epochs.
  config.train.num_steps = 0
  # Global batch size for evaluation; 0 means the training batch size.
  config.train.eval_batch_size = 0
  # Write training metrics every this many steps.
  config.train.log_every = 50
  # Evaluate on the test split every this many steps (and always at the end);
  # 0 means only at the end.
  config.train.eval_every = 0
  # Save a checkpoint every this many steps (and always at the end).
  config.train.checkpoint_every = 1000
  # Number of most recent checkpoints to keep.
  config.train.keep_checkpoints = 3

  # Start from another run's weights (see README, "Starting from another run"): its
  # params, batch statistics and masks, with a new optimizer state at step 0. Only
  # for a new run: a workdir with checkpoints of its own resumes from those.
  config.init_from = ml_collections.ConfigDict()
  # The other run's --workdir ('' = start from the initialisation).
  config.init_from.workdir = ""
  # Its checkpoint at this step (0 = its latest).
  config.init_from.step = 0
  # A regular expression of parameter paths (e.g. "head" or "^head/|stage4") that keep
  # their fresh initial values instead, e.g. a new head for another number of classes.
  config.init_from.skip = ""

  # Data pruning (see README, "Data pruning", and docs/data_pruning.md).
  config.data_pruning = ml_collections.ConfigDict()
  # --- Scoring, by `python -m jaxddp.score`: writes workdir/scores/<score>.npy, one
  # float32 per training example in the dataset's index order, higher = harder.
  # el2n: ||softmax - onehot|| after score_epochs of training, averaged over
  # num_runs runs (Paul et al. 2021); grand: the norm of each example's loss
  # gradient at score_epochs (0 = at initialisation), averaged over num_runs runs;
  # forgetting: forgetting events over a whole training run (Toneva et al. 2019;
  # never-learned examples rank hardest); prototype: cosine distance to the nearest
  # of num_clusters k-means centroids of the penultimate embeddings of the run in
  # config.init_from.workdir (Sorscher et al. 2022; no labels); random.
  config.data_pruning.score = "el2n"
  config.data_pruning.num_runs = 4
  config.data_pruning.score_epochs = 2.0
  config.data_pruning.num_clusters = 10
  # grand only: examples per vmapped gradient computation on each device (memory is
  # this many copies of the gradients).
  config.data_pruning.chunk_size = 32
  # --- Training on a static subset: a scores file ('' = all the data), the fraction
  # of the training examples kept, and which: hard (the highest scores), easy (the
  # lowest), random, or ccs (Zheng et al. 2023: drop the hardest ccs_drop_fraction,
  # then spread the budget evenly over 50 equal-width score strata). class_balance:
  # keep keep_fraction of every class. policy=random needs no scores.
  config.data_pruning.scores = ""
  config.data_pruning.keep_fraction = 1.0
  config.data_pruning.policy = "hard"
  config.data_pruning.ccs_drop_fraction = 0.1
  config.data_pruning.class_balance = False
  # --- Dynamic pruning: none, or infobatch (Qin et al. 2024): each epoch, a random
  # prune_ratio of the examples whose last loss is below the mean are skipped and
  # the other low-loss ones weigh 1/(1 - prune_ratio); the last
  # floor((1 - anneal_fraction) x epochs) epochs use all the data with weight 1 (2
  # of 20 by default). The run's length must be whole epochs (train.num_epochs).
  config.data_pruning.dynamic = "none"
  config.data_pruning.prune_ratio = 0.5
  config.data_pruning.anneal_fraction = 0.875
  # Count forgetting events per example during training (kept in the checkpoints;
  # `jaxddp.score` with score=forgetting turns it on for its run).
  config.data_pruning.track_forgetting = False

  config.parallel = ml_collections.ConfigDict()
  # How the per-device step is mapped over devices: shard_map or pmap.
  config.parallel.backend = "shard_map"
  # On CPU, emulate this many devices and train on all of them (0 = JAX's
  # default device set); in a multi-process run, this many per process. JAX sets
  # its devices when it starts: from the command line this always works; in Python,
  # train_and_evaluate can set it only if nothing has used JAX yet (else call
  # jaxddp.parallel.set_cpu_device_count first).
  config.parallel.cpu_devices = 0
  # Steps dispatched ahead of the host. 2 keeps the devices busy while bounding
  # the work in flight (unbounded dispatch can deadlock CPU collectives).
  config.parallel.max_steps_in_flight = 2

  # Multi-process runs on JAX's distributed runtime (see README, "Many hosts").
  # With the defaults a run is one process, unless it was started by srun or
  # mpirun with several tasks, or JAX_COORDINATOR_ADDRESS is set.
  config.distributed = ml_collections.ConfigDict()
  # auto: an explicit coordinator if one is given, else SLURM or Open MPI if
  # detected, else one process. none: always one process. slurm, ompi, k8s:
  # that cluster's detection (k8s needs `pip install 'jax[k8s]'` and is never
  # chosen by auto, since every pod looks like Kubernetes).
  config.distributed.cluster = "auto"
  # Explicit launch: host:port of process 0 (also JAX_COORDINATOR_ADDRESS) ...
  config.distributed.coordinator_address = ""
  # ... the number of processes (also JAX_NUM_PROCESSES; 0 = from there) ...
  config.distributed.num_processes = 0
  # ... and this process's id in [0, num_processes) (also JAX_PROCESS_ID; -1 = from there).
  config.distributed.process_id = -1
  # GPUs this process uses: '' = JAX's default (under SLURM and Open MPI one GPU
  # per process, else all), 'all' = every GPU of the node (one process per node),
  # or a list such as '0,1,2,3' (also JAX_LOCAL_DEVICE_IDS).
  config.distributed.local_device_ids = ""
  # Seconds to wait for the coordinator and for every process to join.
  config.distributed.initialization_timeout = 300
  # Seconds without a heartbeat after which a process counts as dead; the
  # others then stop instead of waiting for it.
  config.distributed.heartbeat_timeout = 100
  # Seconds without a finished training step (or eval batch, or checkpoint)
  # after which the run stops with an error, e.g. when another process hung.
  # 0 disables it.
  config.distributed.hang_timeout = 1200

  # Hyperparameter search: `python -m jaxddp.tune` (or jaxddp.tune) runs a study of
  # num_trials ordinary runs on Optuna, each in workdir/trials/NNNN (README,
  # "Hyperparameter search"). `python -m jaxddp.main` ignores this section.
  config.tune = ml_collections.ConfigDict()
  # The search space, mirroring the config: each field to search holds a distribution,
  # e.g. config.tune.space = ml_collections.ConfigDict({"optimizer": {"learning_rate":
  # "log_uniform(1e-3, 1.0)"}}) (configs/tune_mnist1d.py). One of
  # uniform(low, high), log_uniform(low, high) (low > 0), int_uniform(low, high),
  # int_log_uniform(low, high) (both ends included), choice(a, b, ...) (values of the
  # field's type). "" leaves a field out of the search (--config.tune.space.X="").
  config.tune.space = ml_collections.ConfigDict()
  # Trials in the whole study, over every worker and host; the study never runs more.
  config.tune.num_trials = 20
  # tpe, random, grid (every value of every choice; choices only) or cmaes.
  config.tune.sampler = "tpe"
  # On the evaluation every train.eval_every steps: asha (successive halving),
  # hyperband, median, or none.
  config.tune.pruner = "asha"
  # What the study optimises: accuracy or loss of the final evaluation on the test
  # split, maximised or minimised ("auto": maximise accuracy, minimise loss).
  config.tune.metric = "accuracy"
  config.tune.direction = "auto"
  # Where the study lives: '' = an SQLite file, workdir/study.db; an SQLAlchemy URL
  # (sqlite:///path, postgresql://user:password@host/db, mysql://...); or
  # journal:PATH, a journal file (for a file system shared by hosts, e.g. NFS).
  config.tune.storage = ""
  # Workers with the same storage and study name share one study ('' = "jaxddp").
  config.tune.study_name = ""
  # Devices each trial trains on, data-parallel (0 = all of this host's devices, one
  # trial at a time). The host's devices are split into groups of this many, one
  # worker per group: --workers=auto starts them all.
  config.tune.devices_per_trial = 0
  # Seed of the sampler (each trial's own seed for training is config.seed).
  config.tune.seed = 0
  # A worker records a heartbeat every heartbeat_seconds while it runs a trial; a
  # trial without one for stale_after_seconds (its worker was killed or its host
  # lost) is taken up again by any worker, from its last checkpoint.
  config.tune.heartbeat_seconds = 10.0
  config.tune.stale_after_seconds = 60.0

  # Fields of your own model, dataset or loss (factories get the whole config): put them
  # here, e.g. config.extra.depth = 4 in your config file, --config.extra.depth=6 on the
  # command line. A field anywhere else that is not above is refused as a typo.
  config.extra = ml_collections.ConfigDict()

  return config
