"""SSIUModel: BasicSR's SRModel trained with the published SSIU recipe or with the SSIU losses.

Published recipe (github.com/eezkni/SSIU ``train.py``) in BasicSR terms::

    model_type: SSIUModel
    train:
      optim_g: {type: AdamW, lr: !!float 1e-3, betas: [0.9, 0.99], weight_decay: !!float 1e-4}
      scheduler: {type: CosineAnnealingRestartLR, periods: [<total_iter>], restart_weights: [1], eta_min: !!float 1e-6}
      total_iter: <total_iter>
      pixel_opt: {type: L1Loss, loss_weight: 1.0}
      fft_opt: {type: FFTLoss, loss_weight: 0.01}

Add ``ssim_opt`` (:class:`~ssiu_arch.losses.SSIMUnfoldingLoss`) and/or ``moe_opt``
(:class:`~ssiu_arch.losses.MoELoadBalancingLoss`) to train with the new losses.
"""
from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from os import path as osp

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DataParallel, DistributedDataParallel
from tqdm import tqdm

from ssiu_arch.archs.ssiu_arch import SSIU, pad_to_multiple
from ssiu_arch.cpu.memory import retain_freed_memory
from ssiu_arch.datasets_lmdb.imresize import imresize
from ssiu_arch.evaluation.metrics_schema import make_metrics, write_metrics
from ssiu_arch.utils.cpu_features import bf16_pays, bf16_product_speedup
from ssiu_arch.utils.fileio import save_atomic
from ssiu_arch.utils.weights import CONFIG_KEY, STATE_KEYS, CheckpointError, read_checkpoint, save_weights

__all__ = ['SSIUModel', 'compile_options', 'mixed_precision_dtype']

# train.<key> -> (attribute, log name) of each loss SSIUModel builds
LOSSES = OrderedDict([('pixel_opt', ('cri_pix', 'l_pix')), ('fft_opt', ('cri_fft', 'l_fft')),
                      ('ssim_opt', ('cri_ssim', 'l_ssim')), ('moe_opt', ('cri_moe', 'l_moe'))])

# train.mixed_precision -> autocast dtype
MIXED_PRECISION = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def compile_options(opt: dict) -> dict | None:
    """``network_g_compile`` as ``torch.compile`` keywords, or None for an eager training step.

    Raises ``ValueError`` naming the key for a value that is not a bool or a dict of ``torch.compile`` keywords.
    """
    value = opt.get('network_g_compile', False)
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f'network_g_compile: expected true, false or a dict of torch.compile keywords, got {value!r}')
    known = [name for name in inspect.signature(torch.compile).parameters if name != 'model']
    unknown = [key for key in value if key not in known]
    if unknown:
        raise ValueError(f'network_g_compile.{unknown[0]}: not a torch.compile keyword; it takes {", ".join(known)}')
    return dict(value)


def mixed_precision_dtype(opt: dict, device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``train.mixed_precision`` on ``device_type`` (``'cpu'``/``'cuda'``), None for float32.

    Raises ``ValueError`` naming the key for an unknown value, fp16 on the CPU, or bf16 on a GPU without it.
    """
    value = (opt.get('train') or {}).get('mixed_precision', False)
    if value is None or value is False:
        return None
    if value not in MIXED_PRECISION:
        raise ValueError(f'train.mixed_precision: expected false, bf16 or fp16, got {value!r}')
    if value == 'fp16' and device_type != 'cuda':
        raise ValueError('train.mixed_precision: fp16 needs a CUDA device (num_gpu > 0); on the CPU use bf16 or false')
    if value == 'bf16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError('train.mixed_precision: this GPU does not support bf16; use fp16 or false')
    return MIXED_PRECISION[value]


@MODEL_REGISTRY.register()
class SSIUModel(SRModel):
    """SRModel with the SSIU losses, any ``torch.optim`` optimizer and leaderboard-ready validation.

    Losses: any non-empty subset of ``train.pixel_opt``, ``fft_opt``, ``ssim_opt`` and ``moe_opt``, logged
    as ``l_pix``, ``l_fft``, ``l_ssim``, ``l_moe`` and their sum ``l_total``. The network is called with
    ``return_aux=True`` only when the SSIM loss has ``step_weights`` (it gets ``step_outputs``) or the MoE
    loss is on (it gets ``gates``).

    Optimizer: ``train.optim_g.type`` names any ``torch.optim`` class (``Adam``, ``AdamW``, ``SGD``, ...);
    the other keys are its keywords. basicsr 1.4.2 itself knows only Adam.

    Scheduler: BasicSR's own. The published cosine decay to 1e-6 over the whole run is
    ``CosineAnnealingRestartLR`` with one period, ``periods: [total_iter]``, ``restart_weights: [1]``,
    ``eta_min: 1e-6``: per iteration it equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_iter,
    eta_min=1e-6)`` (the published code steps the same curve per epoch).

    Compatibility with basicsr 1.4.2:

    * ``model_to_device``: with ``dist`` on CPU the network is wrapped in ``DistributedDataParallel``
      without ``device_ids`` (BasicSR passes the current CUDA device, which fails without CUDA); on CUDA
      BasicSR's behaviour is kept.
    * Checkpoints (``net_g_N.pth``, ``N.state``) are written to a temporary name and renamed, by rank 0
      only: a kill while saving leaves the previous files intact, and temporary names do not end in
      ``.state``, so auto-resume never picks a half-written state.
    * Validation: besides BasicSR's log and best-metric tracking, per-image and mean metrics go to
      ``<path.log>/metrics_<dataset>.json`` and ``.csv`` (rewritten at every validation), computed with
      BasicSR's ``calculate_metric`` on ``tensor2img`` outputs as SRModel does. They are built, checked
      and written by :mod:`ssiu_arch.evaluation.metrics_schema`, the schema ``ssiu results`` reads.
    * ``val.bicubic_baseline: true`` also logs, per validation set, the metrics of MATLAB bicubic upscaling
      of the same LR images (measured once, with the same metric options), so a log shows what the
      network must beat.
    * Weights (``path.pretrain_network_g``) are read by :mod:`ssiu_arch.utils.weights`: ``.pth``/``.pt`` with
      ``weights_only=True`` or ``.safetensors``, in BasicSR's, the published or a bare layout, NaN/Inf refused;
      ``param_key`` and ``strict_load_g`` keep BasicSR's meaning (``params_ema`` falls back to ``params``).
    * ``net_g_N.pth`` also holds the ``network_g`` options (beside ``params``); ``logger.save_safetensors: true``
      also writes ``net_g_N.safetensors`` (the EMA weights when there are, options as metadata), for spandrel,
      chaiNNer and ComfyUI.
    * Any image size: SSIU pads internally; another network with a ``pad_multiple`` attribute gets its
      input reflect-padded to that multiple in :meth:`test` and its output cropped back.

    Training step options (checked when the model is built; a bad value raises ``ValueError`` naming the key):

    * ``network_g_compile`` (top level, beside ``network_g``; default ``false``): ``true`` runs the training
      forward through ``torch.compile`` with its defaults, a dict passes its keys to ``torch.compile``
      (e.g. ``{dynamic: false, mode: max-autotune}``). Only the training step is compiled: ``net_g`` itself
      stays the plain module, so validation and testing run eagerly at any image size, checkpoints keep the
      plain state-dict keys (no ``_orig_mod.``) and EMA tracks the plain module. Under DDP, DDP wraps the
      compiled network, as torch's guide to where to apply ``torch.compile`` recommends, and validation
      calls the plain network inside both wrappers.
      Compiling costs time at the first iteration; ``benchmarks/bench_train.py`` prints after how many
      steps it pays off.
    * On the CPU, training makes glibc malloc keep freed memory (:func:`ssiu_arch.cpu.memory.retain_freed_memory`):
      eager autograd allocates every activation afresh, and with malloc's defaults each one arrives as fresh
      zero-filled pages, about a fifth of a full-width step's time. The resident set then stays at the step's
      peak between steps instead of falling back. ``train.retain_freed_memory: false`` keeps the defaults.
    * ``train.mixed_precision`` (default ``false``): ``bf16`` or ``fp16`` runs the training forward under
      ``torch.autocast``; the output and the auxiliary outputs (MoE gates renormalised) are cast back to
      float32 before the losses. ``fp16`` needs CUDA and scales the loss with ``torch.amp.GradScaler`` (whose
      state is not saved: a resumed run starts from its initial scale); ``bf16`` needs no scaler and also works
      on the CPU. Validation and testing stay in float32.
    """

    def init_training_settings(self) -> None:
        compile_kwargs = compile_options(self.opt)
        self.amp_dtype = mixed_precision_dtype(self.opt, self.device.type)
        self.net_g.train()
        train_opt = self.opt['train']
        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            get_root_logger().info(f'Use Exponential Moving Average with decay: {self.ema_decay}')
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            load_path = self.opt['path'].get('pretrain_network_g')
            if load_path is not None:
                self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True), 'params_ema')
            else:
                self.model_ema(0)
            self.net_g_ema.eval()
        self._build_losses(train_opt)
        self.setup_optimizers()
        self.setup_schedulers()
        self._setup_training_step(compile_kwargs)
        retain = train_opt.get('retain_freed_memory', True)
        if not isinstance(retain, bool):
            raise ValueError(f'train.retain_freed_memory: expected true or false, got {retain!r}')
        if self.device.type == 'cpu' and retain and retain_freed_memory():
            get_root_logger().info('CPU training: freed memory stays with the process for reuse (glibc malloc '
                                   'thresholds raised; train.retain_freed_memory: false keeps the defaults)')

    def _setup_training_step(self, compile_kwargs: dict | None) -> None:
        """The network the training step calls (``net_g``, or ``net_g`` compiled) and the fp16 loss scaler."""
        logger = get_root_logger()
        self.net_g_train = self.net_g
        self.compiled, self.training_forward = compile_kwargs is not None, None
        if compile_kwargs is not None:
            if isinstance(self.net_g, DataParallel):
                raise ValueError('network_g_compile: torch.compile does not support DataParallel (num_gpu > 1 '
                                 'without a launcher); launch with torchrun and --launcher pytorch (DDP)')
            if not self.opt['dist']:  # under DDP, model_to_device compiled the network inside DDP
                self.net_g_train = torch.compile(self.net_g, **compile_kwargs)
            kwargs = ', '.join(f'{k}={v!r}' for k, v in compile_kwargs.items())
            logger.info(f'Training forward compiled with torch.compile({kwargs}); the first iterations include '
                        'the compilation')
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        if self.amp_dtype is not None:
            logger.info(f'Mixed precision: {self.opt["train"]["mixed_precision"]} autocast for the training forward on '
                        f'{self.device.type}, losses in float32' + (', loss scaling' if self.grad_scaler else ''))
        if self.amp_dtype == torch.bfloat16 and self.device.type == 'cpu' and not bf16_pays():
            speedup = bf16_product_speedup()
            rate = ('has no native bfloat16' if speedup is None
                    else f'runs bfloat16 products at {speedup:.2f}x the float32 rate')
            logger.warning(f'train.mixed_precision: bf16 on this CPU, which {rate}: the step will likely be slower '
                           'than float32 (mixed_precision: false)')

    def _build_losses(self, train_opt: dict) -> None:
        unknown = [k for k, v in train_opt.items() if k.endswith('_opt') and k not in LOSSES and v]
        if unknown:
            raise ValueError(f'train.{unknown[0]}: SSIUModel does not use this loss; it builds '
                             f'{", ".join(f"train.{k}" for k in LOSSES)}')
        for key, (attr, _) in LOSSES.items():
            loss_opt = train_opt.get(key)
            if loss_opt and loss_opt.get('reduction', 'mean') == 'none':
                raise ValueError(f"train.{key}.reduction: 'none' gives no scalar to train on; use 'mean' or 'sum'")
            setattr(self, attr, build_loss(loss_opt).to(self.device) if loss_opt else None)
        if all(getattr(self, attr) is None for attr, _ in LOSSES.values()):
            raise ValueError(f'SSIUModel: no loss configured; set at least one of '
                             f'{", ".join(f"train.{k}" for k in LOSSES)}')
        self.use_aux = bool(getattr(self.cri_ssim, 'step_weights', None)) or self.cri_moe is not None
        forward = self.get_bare_model(self.net_g).forward
        if self.use_aux and 'return_aux' not in inspect.signature(forward).parameters:
            raise ValueError(f'train.ssim_opt.step_weights and train.moe_opt need a network called with '
                             f'return_aux=True; network_g.type {self.opt["network_g"]["type"]} has no such argument')

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        """Any ``torch.optim`` optimizer by class name, e.g. the published ``AdamW`` (betas 0.9/0.99, wd 1e-4)."""
        optim_cls = getattr(torch.optim, str(optim_type), None)
        if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
            known = sorted(name for name, obj in vars(torch.optim).items() if isinstance(obj, type)
                           and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer)
            raise ValueError(f'train.optim_g.type: unknown optimizer {optim_type!r}; torch.optim provides: '
                             f'{", ".join(known)}')
        try:
            return optim_cls(params, lr=lr, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f'train.optim_g: cannot build torch.optim.{optim_type}(lr={lr!r}, '
                             f'{", ".join(f"{k}={v!r}" for k, v in kwargs.items())}): {err}') from err

    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        if not self.opt['dist']:
            return super().model_to_device(net)
        net = net.to(self.device)
        compile_kwargs = compile_options(self.opt) if self.is_train else None
        if compile_kwargs is not None:  # DDP around the compiled network, as torch's compile guide recommends
            net = torch.compile(net, **compile_kwargs)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        return DistributedDataParallel(net, device_ids=device_ids,
                                       find_unused_parameters=self.opt.get('find_unused_parameters', False))

    def _training_forward(self) -> str:
        """What the training forward runs, as the network's engine decides it for this batch (CPU float32 SSIU:
        the CPU engine's training path; GPUs, autocast, compiled or other networks: their own modules)."""
        net = self.get_bare_model(self.net_g)
        engine = getattr(net, 'engine', None)
        if engine is not None and not self.compiled and engine.accepts(net, self.lq):
            return "the CPU engine's training path (ssiu_arch/cpu/training.py)"
        return "the network's own modules"

    def get_bare_model(self, net: torch.nn.Module) -> torch.nn.Module:
        """The network inside DDP/DataParallel and inside a ``torch.compile`` wrapper."""
        bare = super().get_bare_model(net)
        return getattr(bare, '_orig_mod', bare)

    def optimize_parameters(self, current_iter: int) -> None:
        self.optimizer_g.zero_grad()
        aux = {}
        # net_g_train is net_g (possibly DDP-wrapped, so gradients are synchronised) or net_g compiled
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.training_forward is None:
                self.training_forward = self._training_forward()
                get_root_logger().info(f'Training forward: {self.training_forward}')
            if self.use_aux:
                self.output, aux = self.net_g_train(self.lq, return_aux=True)
            else:
                self.output = self.net_g_train(self.lq)
        if self.amp_dtype is not None:  # losses in float32: half-precision FFTs and sums lose accuracy
            self.output = self.output.float()
            if aux:  # half-precision gates sum to 1 only within ~1e-2: renormalised over the experts
                gates = aux['gates'].float()
                aux = {'gates': gates / gates.sum(dim=1, keepdim=True),
                       'step_outputs': [step.float() for step in aux['step_outputs']]}

        loss_dict = OrderedDict()
        if self.cri_pix:
            loss_dict['l_pix'] = self.cri_pix(self.output, self.gt)
        if self.cri_fft:
            loss_dict['l_fft'] = self.cri_fft(self.output, self.gt)
        if self.cri_ssim:
            loss_dict['l_ssim'] = self.cri_ssim(self.output, self.gt, step_outputs=aux.get('step_outputs'))
        if self.cri_moe:
            loss_dict['l_moe'] = self.cri_moe(aux['gates'])
        l_total = sum(loss_dict.values())
        loss_dict['l_total'] = l_total
        if self.grad_scaler is not None:
            self.grad_scaler.scale(l_total).backward()
            self.grad_scaler.step(self.optimizer_g)
            self.grad_scaler.update()
        else:
            l_total.backward()
            self.optimizer_g.step()

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def _pad_multiple(self, net: torch.nn.Module) -> int:
        bare = self.get_bare_model(net)
        return 1 if isinstance(bare, SSIU) else int(getattr(bare, 'pad_multiple', 1) or 1)

    def test(self) -> None:
        # the plain network, eagerly: no DDP forward, no compilation for each validation image size
        net = self.get_bare_model(self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g)
        h, w = self.lq.shape[-2:]
        lq = pad_to_multiple(self.lq, self._pad_multiple(net))
        was_training = net.training
        net.eval()
        with torch.no_grad():
            output = net(lq)
        net.train(was_training)
        scale = output.shape[-1] // lq.shape[-1]
        self.output = output[..., :h * scale, :w * scale]

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img: bool) -> None:
        dataset_name = dataloader.dataset.opt['name']
        metrics_opt = self.opt['val'].get('metrics')
        with_metrics = metrics_opt is not None
        if with_metrics:
            self._initialize_best_metric_results(dataset_name)
            self.metric_results = {metric: 0 for metric in metrics_opt}
        pbar = tqdm(total=len(dataloader), unit='image') if self.opt['val'].get('pbar', False) else None
        baselines = self.__dict__.setdefault('bicubic_baselines', {})
        measure_bicubic = with_metrics and self.opt['val'].get('bicubic_baseline') and dataset_name not in baselines
        bicubic_rows = []

        images = []
        for val_data in dataloader:
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            metric_data = {'img': tensor2img([visuals['result']])}
            if 'gt' in visuals:
                metric_data['img2'] = tensor2img([visuals['gt']])
                del self.gt
            if measure_bicubic:
                upscaled = imresize(tensor2img([visuals['lq']]), self.opt['scale'])
                bicubic = {'img': upscaled, 'img2': metric_data['img2']}
                bicubic_rows.append({name: float(calculate_metric(bicubic, o)) for name, o in metrics_opt.items()})
            del self.lq
            del self.output
            torch.cuda.empty_cache()

            if save_img:
                imwrite(metric_data['img'], self._visualization_path(dataset_name, img_name, current_iter))
            if with_metrics:
                row = {'name': img_name}
                for name, opt_ in metrics_opt.items():
                    row[name] = float(calculate_metric(metric_data, opt_))
                    self.metric_results[name] += row[name]
                images.append(row)
            if pbar is not None:
                pbar.update(1)
                pbar.set_description(f'Test {img_name}')
        if pbar is not None:
            pbar.close()

        if with_metrics:
            for metric in self.metric_results:
                self.metric_results[metric] /= len(images)
                self._update_best_metric_result(dataset_name, metric, self.metric_results[metric], current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
            self._write_metrics(dataset_name, current_iter, images)
        if measure_bicubic:
            baselines[dataset_name] = {name: sum(r[name] for r in bicubic_rows) / len(bicubic_rows)
                                       for name in metrics_opt}
        if dataset_name in baselines:
            values = '\t'.join(f'# {name}: {value:.4f}' for name, value in baselines[dataset_name].items())
            get_root_logger().info(f'Bicubic baseline {dataset_name} (MATLAB bicubic of the LR): {values}')

    def _visualization_path(self, dataset_name: str, img_name: str, current_iter) -> str:
        if self.opt['is_train']:
            return osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
        suffix = self.opt['val'].get('suffix') or self.opt['name']
        return osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')

    def _write_metrics(self, dataset_name: str, current_iter, images: list[dict]) -> None:
        """Write ``metrics_<dataset>.json`` and ``.csv`` beside the log, through the metrics schema."""
        metrics_opt = self.opt['val']['metrics']
        first = next(iter(metrics_opt.values()))
        names = list(metrics_opt)
        doc = make_metrics(name=self.opt['name'], model=type(self.get_bare_model(self.net_g)).__name__,
                           scale=int(self.opt.get('scale', 1)), dataset=dataset_name,
                           crop_border=int(first.get('crop_border', 0)),
                           test_y_channel=bool(first.get('test_y_channel', False)), iter=current_iter,
                           metrics=names, images=images,
                           mean={name: float(self.metric_results[name]) for name in names},
                           origin=f'validation of {dataset_name}')
        path = write_metrics(self.opt['path']['log'], doc)
        get_root_logger().info(f'Per-image metrics of {dataset_name} written to {path} and .csv')

    def _save_atomic_with_retry(self, obj: object, save_path: str) -> None:
        """``save_atomic`` with BasicSR's three attempts; a failed save is logged and skipped, as in BasicSR."""
        logger = get_root_logger()
        for attempt in range(3, 0, -1):
            try:
                save_atomic(obj, save_path)
                return
            except Exception as err:
                logger.warning(f'Save {save_path} error: {err}, remaining retry times: {attempt - 1}')
                if attempt > 1:
                    time.sleep(1)
        logger.warning(f'Still cannot save {save_path}; the previous file is kept.')

    def load_network(self, net, load_path: str, strict: bool = True, param_key: str | None = 'params') -> None:
        """BasicSR's ``load_network`` reading any layout and ``.safetensors`` (see the class docstring)."""
        logger = get_root_logger()
        net = self.get_bare_model(net)
        try:
            state, _ = read_checkpoint(load_path, param_key)
        except CheckpointError:
            if param_key is None:
                raise
            state, _ = read_checkpoint(load_path)  # BasicSR falls back to params; we to any layout we read
            logger.info(f'Loading: {load_path} has no {param_key}; using its {"/".join(STATE_KEYS)} weights.')
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        self._print_different_keys_loading(net, state, strict)
        try:
            net.load_state_dict(state, strict=strict)
        except RuntimeError as err:
            raise CheckpointError(f'{load_path}: does not fit network_g {net.__class__.__name__}: '
                                  f'{" ".join(str(err).split())[:300]}') from None

    @master_only
    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        """BasicSR's ``save_network`` (same file name, plus the ``network_g`` options), written atomically."""
        label_iter = 'latest' if current_iter == -1 else current_iter
        save_path = osp.join(self.opt['path']['models'], f'{net_label}_{label_iter}.pth')
        nets = net if isinstance(net, list) else [net]
        param_keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(param_keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(param_keys)} param keys')
        save_dict = {}
        for net_, key in zip(nets, param_keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict((k.removeprefix('module.'), v.cpu()) for k, v in state_dict.items())
        options = self.opt.get(CONFIG_KEY)
        if net_label == 'net_g' and options:
            save_dict[CONFIG_KEY] = dict(options)
        self._save_atomic_with_retry(save_dict, save_path)
        if net_label == 'net_g' and self.opt.get('logger', {}).get('save_safetensors'):
            key = next(k for k in STATE_KEYS if k in save_dict)
            try:
                save_weights(save_path[:-len('.pth')] + '.safetensors', save_dict[key], options, 'safetensors')
            except Exception as err:  # like a failed .pth save: logged, training goes on
                get_root_logger().warning(f'Cannot save {save_path[:-4]}.safetensors: {err}')

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        """BasicSR's ``save_training_state`` (``<iter>.state``), written atomically."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        self._save_atomic_with_retry(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))
