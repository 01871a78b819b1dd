"""Data parallelism and memory: DDP (the default), FSDP2 sharding (``--fsdp``) and activation checkpointing
(``--grad_ckpt``), all with PyTorch's own engines (``torch.distributed.fsdp.fully_shard``, ``torch.utils.checkpoint``).

The model names its transformer blocks: ``model.transformer_blocks()`` (``BlockStructured``; a pretraining model's
default is every ModuleList named ``*blocks``, a ViT's its ``blocks``). Each is sharded on its own and recomputed
by ``--grad_ckpt``. A frozen teacher held outside the module tree is left alone.
"""
from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from util.distributed import Dist, is_sharded
from util.settings import SettingsError


@runtime_checkable
class BlockStructured(Protocol):
    """A model that names the blocks FSDP shards one by one and activation checkpointing recomputes; every one
    must run through its own ``forward`` (hooks and the checkpointed forward see nothing else)."""

    def transformer_blocks(self) -> list[nn.Module]: ...


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


def shard(model: nn.Module, blocks: list[nn.Module], dist_info: Dist, amp: str) -> nn.Module:
    """FSDP2: ``fully_shard`` each of ``blocks``, then the root, over all ranks (in place: parameters become DTensor
    shards; build the optimiser afterwards). With ``amp`` bf16 the parameters are all-gathered in bf16 and the
    gradients reduced in fp32; the inputs are not cast (autocast does the rest, so targets keep their precision)."""
    # each rank built its model from its own seed (seed + rank); start from rank 0's weights, as DDP does
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if amp == "bf16" or (amp == "auto" and dist_info.device.type == "cuda") else MixedPrecisionPolicy()
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def parallelize(model: nn.Module, dist_info: Dist, fsdp: bool, grad_ckpt: bool, amp: str) -> str:
    """``grad_ckpt``: activation checkpointing of every block; ``fsdp``: then shard the model (in place; build the
    optimiser afterwards). A model that names no blocks is refused before anything changes. Returns one line that
    says what was done."""
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
        shard(model, blocks, dist_info, amp)
        done.append(f"FSDP2 over {dist_info.world_size} ranks, {len(blocks)} blocks + root")
    return "memory: " + "; ".join(done)


def wrap_model(model: nn.Module, dist_info: Dist, compile: bool = False) -> nn.Module:
    """The module the training loop calls: DDP when distributed (gradients of trainable parameters only) unless
    FSDP sharded the model already, then torch.compile with ``compile``."""
    if dist_info.distributed and not is_sharded(model):
        device = dist_info.device
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None)
    return torch.compile(model) if compile else model


def full_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's state dict (keys under ``prefix``, prefix removed) with whole tensors: under FSDP a collective
    (every rank must call it) that gathers the shards to the CPU of rank 0; the other ranks get an empty dict."""
    if is_sharded(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
