"""Data parallelism and memory: DDP (the default), FSDP2 sharding (``--fsdp``) and activation checkpointing
(``--grad_ckpt``), all with PyTorch's own engines (``torch.distributed.fsdp.fully_shard``, ``torch.utils.checkpoint``).

The model names its transformer blocks: ``model.transformer_blocks()`` (``BlockStructured``; a pretraining model's
default is every ModuleList named ``*blocks``, a ViT's its ``blocks``). Each is sharded on its own, recomputed by
``--grad_ckpt`` and, under ``--fsdp --compile``, compiled on its own. A model may also name large modules outside
its blocks that FSDP shards on their own (``model.shard_units()``, e.g. XTRA's pixel heads), so that they are not
gathered with the root for the whole step. A frozen teacher held outside the module tree is left alone.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from util.distributed import Dist, broadcast_from_rank0, is_sharded
from util.settings import SettingsError


@runtime_checkable
class BlockStructured(Protocol):
    """A model that names the blocks FSDP shards one by one and activation checkpointing recomputes; every one
    must run through its own ``forward`` (hooks and the checkpointed forward see nothing else)."""

    def transformer_blocks(self) -> list[nn.Module]: ...


def shard_units(model: nn.Module) -> list[nn.Module]:
    """What FSDP shards on its own besides the blocks: ``model.shard_units()`` where the model names such modules."""
    return list(model.shard_units()) if hasattr(model, "shard_units") else []


def recompute_blocks(blocks: list[nn.Module]) -> None:
    """Activation checkpointing (non-reentrant) of every block: its activations are recomputed in the backward
    pass instead of being stored. The block stays the same module (same parameter names, same hooks); only its
    ``forward`` runs under ``torch.utils.checkpoint`` while gradients are enabled.
    Not torch's ``checkpoint_wrapper``: it renames every parameter (``_checkpoint_wrapped_module.``), which the
    name-based rules (layer decay, no_weight_decay) would then miss; its composable form is private API."""
    for blk in blocks:
        forward = blk.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        blk.forward = checkpointed


def shard(model: nn.Module, units: list[nn.Module], dist_info: Dist, amp: str) -> nn.Module:
    """FSDP2: ``fully_shard`` each of ``units`` (the blocks, then any other large module), then the root, over all
    ranks (in place: parameters become DTensor shards; build the optimiser afterwards). With ``amp`` bf16 the
    parameters are all-gathered in bf16 and the gradients reduced in fp32; the inputs are not cast (autocast does the
    rest, so targets keep their precision)."""
    # each rank built its model from its own seed (seed + rank); start from rank 0's weights, as DDP does
    with torch.no_grad():
        broadcast_from_rank0([*model.parameters(), *model.buffers()])
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if amp == "bf16" or (amp == "auto" and dist_info.device.type == "cuda") else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def parallelize(model: nn.Module, dist_info: Dist, fsdp: bool, grad_ckpt: bool, amp: str, compile: bool = False
                ) -> str:
    """``grad_ckpt``: activation checkpointing of every block; ``fsdp``: then shard the model (in place; build the
    optimiser afterwards), with ``compile`` each block compiled before it is sharded (torchtitan's order:
    checkpointing, compile per block, ``fully_shard``; the FSDP hooks stay outside the compiled code). A model that
    names no blocks is refused before anything changes. Returns one line that says what was done."""
    flags = [flag for flag, on in (("--fsdp", fsdp), ("--grad_ckpt", grad_ckpt)) if on]
    if not flags:
        return f"memory: {'DDP' if dist_info.distributed else 'one process'}, full activations"
    blocks = model.transformer_blocks() if isinstance(model, BlockStructured) else []
    if not blocks:
        raise SettingsError(f"{' and '.join(flags)} cannot run on {type(model).__name__}: it names no transformer "
                            "blocks (transformer_blocks())")
    done = []
    if grad_ckpt:
        recompute_blocks(blocks)
        done.append(f"activation checkpointing of {len(blocks)} blocks")
    if fsdp:
        if compile:
            for blk in blocks:
                blk.compile()  # in place: parameter names and checkpoints are unchanged
            done.append(f"{len(blocks)} blocks compiled")
        units = shard_units(model)
        if units:  # FSDP warns of a view a unit returns (a Linear with a bias, 3-D input); none is modified in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        shard(model, blocks + units, dist_info, amp)
        others = f" + {len(units)} other modules" if units else ""
        done.append(f"FSDP2 over {dist_info.world_size} ranks, {len(blocks)} blocks{others} + root")
    return "memory: " + "; ".join(done)


def wrap_model(model: nn.Module, dist_info: Dist, compile: bool = False) -> nn.Module:
    """The module the training loop calls: DDP when distributed (gradients of trainable parameters only) unless
    FSDP sharded the model already, then torch.compile with ``compile`` (a sharded model's blocks were compiled one
    by one in :func:`parallelize`). DDP broadcasts no buffers when no module updates its own (running BatchNorm
    statistics): the others are constants, the same on every rank."""
    if dist_info.distributed and not is_sharded(model):
        device = dist_info.device
        sync = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())
        ddp = torch.nn.parallel.DistributedDataParallel
        # torch 2.13 renamed the flag (the old name still works there, with a deprecation warning)
        flag = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
            "broadcast_buffers"
        model = ddp(model, device_ids=[device.index] if device.index is not None else None, **{flag: sync})
    return torch.compile(model) if compile and not is_sharded(model) else model


def full_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's state dict (keys under ``prefix``, prefix removed) with whole tensors: under FSDP a collective
    (every rank must call it) that gathers the shards to the CPU of rank 0; the other ranks get an empty dict."""
    if is_sharded(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
