"""Distributed, resumable training-token loader over challenge shards.

All ranks walk the same global token stream: the shards matching a glob, in
sorted order (seed 0) or a seeded permutation (seed != 0), repeated forever.
Each `next_batch` call takes `(local_tokens + 1) * world_size` tokens from the
stream and rank r keeps the r-th contiguous chunk (inputs = chunk[:-1],
targets = chunk[1:]). Because the split depends only on the per-rank span,
one process with grad_accum 2 sees exactly the tokens two processes with
grad_accum 1 see, in the same order.

Memory stays small: only the shard under the read position is mapped
(np.memmap), and the chunks of other ranks are skipped by arithmetic on the
header token counts, never read.

Library module; no CLI. Typical use:

    loader = DistributedTokenLoader("data/datasets/fineweb10B_sp1024/fineweb_train_*.bin", rank, world_size)
    x, y = loader.next_batch(global_tokens=524288, seq_len=1024, grad_accum_steps=8 // world_size)
    ckpt["loader"] = loader.state_dict()      # later: loader.load_state_dict(ckpt["loader"])
"""

import numpy as np
import torch

from data.shards import list_shards, memmap_shard, shard_token_count


class DistributedTokenLoader:
    """Deterministic infinite token stream over shards, split into per-rank (x, y) batches."""

    def __init__(self, pattern, rank: int, world_size: int, seed: int = 0, vocab_size: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.pattern = str(pattern)
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.vocab_size = vocab_size  # token ids are checked against it as each shard is opened
        paths = list_shards(self.pattern)
        # Seed 0 keeps the export's order, which is itself a frozen shuffle (the challenge's
        # data/README.md; docs/TECHNIQUES.md, "Shard format and tokenizer"), so fewer shards means a
        # prefix of the same stream.
        if self.seed == 0:
            order = np.arange(len(paths))
        else:
            order = np.random.default_rng(self.seed).permutation(len(paths))
        self.paths = [paths[i] for i in order]
        self.counts = [shard_token_count(p) for p in self.paths]  # headers only; validates every file up front
        self.total_tokens = sum(self.counts)
        if self.total_tokens == 0:
            raise ValueError(f"shards matching {self.pattern!r} contain no tokens; rebuild or re-download them")
        # Stream position: shard index in self.paths, token offset inside it.
        self.shard_idx = 0
        self.offset = 0
        self.epoch = 0
        self.tokens_consumed = 0
        self._mapped_idx = -1
        self._mapped = None

    # -- position bookkeeping ------------------------------------------------

    def _step_to_next_shard(self) -> None:
        self.shard_idx += 1
        self.offset = 0
        if self.shard_idx == len(self.paths):
            self.shard_idx = 0
            self.epoch += 1

    def _skip(self, n: int) -> None:
        """Advance the stream by n tokens without reading them (other ranks' chunks)."""
        self.tokens_consumed += n
        while n > 0:
            left = self.counts[self.shard_idx] - self.offset
            if n < left:
                self.offset += n
                return
            n -= left
            self._step_to_next_shard()

    def _take(self, n: int) -> np.ndarray:
        """Read the next n tokens of the stream, crossing shard ends and wrapping around."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            left = self.counts[self.shard_idx] - self.offset
            if left == 0:  # empty shard, or positioned at an end
                self._step_to_next_shard()
                continue
            if self._mapped_idx != self.shard_idx:
                # Drop the previous mapping first so at most one shard is mapped.
                self._mapped = None
                self._mapped = memmap_shard(self.paths[self.shard_idx], self.vocab_size)
                self._mapped_idx = self.shard_idx
            k = min(n - filled, left)
            out[filled : filled + k] = self._mapped[self.offset : self.offset + k]
            filled += k
            self.offset += k
            if self.offset == self.counts[self.shard_idx]:
                self._step_to_next_shard()
        self.tokens_consumed += n
        return out

    # -- public API ------------------------------------------------------------

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int):
        """Return this rank's (x, y), int64 tensors of shape (local_tokens // seq_len, seq_len).

        local_tokens = global_tokens // (world_size * grad_accum_steps); it must be a
        positive multiple of seq_len so the chunk reshapes into whole sequences.
        """
        if seq_len <= 0 or grad_accum_steps <= 0:
            raise ValueError(f"seq_len and grad_accum_steps must be positive, got {seq_len}, {grad_accum_steps}")
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        if local_tokens <= 0 or local_tokens % seq_len:
            raise ValueError(
                f"global_tokens={global_tokens} over world_size={self.world_size} x "
                f"grad_accum_steps={grad_accum_steps} "
                f"gives {local_tokens} tokens per rank per micro-step, which is not a positive multiple of "
                f"seq_len={seq_len}; make the global batch a multiple of "
                f"{self.world_size * grad_accum_steps * seq_len}"
            )
        span = local_tokens + 1
        self._skip(self.rank * span)
        chunk = self._take(span)
        self._skip((self.world_size - 1 - self.rank) * span)
        t = torch.from_numpy(chunk)
        return t[:-1].reshape(-1, seq_len), t[1:].reshape(-1, seq_len)

    def state_dict(self) -> dict:
        """Plain-int snapshot of the stream position; identical on every rank."""
        return {
            "seed": self.seed,
            "num_shards": len(self.paths),
            "total_tokens": self.total_tokens,
            "shard_idx": self.shard_idx,
            "offset": self.offset,
            "epoch": self.epoch,
            "tokens_consumed": self.tokens_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position saved by `state_dict` on the same shard set and seed."""
        for key in ("seed", "num_shards", "total_tokens"):
            mine = {"seed": self.seed, "num_shards": len(self.paths), "total_tokens": self.total_tokens}[key]
            if int(state[key]) != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader over {self.pattern!r} has {key}={mine}; "
                    f"resume with the same data files and seed, or start the data stream fresh"
                )
        shard_idx, offset = int(state["shard_idx"]), int(state["offset"])
        if not 0 <= shard_idx < len(self.paths) or not 0 <= offset <= self.counts[shard_idx]:
            raise ValueError(f"loader state position shard_idx={shard_idx} offset={offset} is out of range")
        self.shard_idx, self.offset = shard_idx, offset
        self.epoch = int(state["epoch"])
        self.tokens_consumed = int(state["tokens_consumed"])
