"""The paged KV cache's blocks: who holds them, and which full blocks can be shared by prefix.

Every layer's cache has the same ``num_blocks`` blocks of ``block_size`` token slots, so one
block table per sequence serves all layers.  A block is held by reference count.  A full block
whose K/V are computed is registered under a hash of its tokens and of every token before it:
a later sequence that starts with the same tokens (a shared system prompt) takes that block
instead of computing it again.  Released blocks keep their hash while they wait in the free
list, and are reused least recently released first, so a popular prefix survives.
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] = ()  # the tokens under ``hash``, checked on every hit


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs ≥ 1 block of ≥ 1 slot, got {num_blocks} × {block_size}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks holding the longest cached run of ``seq``'s leading full blocks.  The last
        token is never taken from the cache: it must be computed to give the next logits."""
        if not self.prefix_caching:
            return []
        found, parent = [], None
        for start in range(0, len(seq) - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(seq.tokens[start:start + self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            found.append(block_id)
        return found

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: put ``seq``'s newly computed full blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        parent = None
        for index in range(seq.num_computed // self.block_size):
            block = self.blocks[seq.block_table[index]]
            tokens = tuple(seq.tokens[index * self.block_size:(index + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            if block.hash is None and parent not in self.cached:
                block.hash, block.tokens = parent, tokens
                self.cached[parent] = block.block_id

    # -- holding blocks -----------------------------------------------------------------------
    def can_admit(self, seq: Sequence, prefix: list[int], num_tokens: int) -> bool:
        """Whether ``seq`` can hold ``prefix`` and enough blocks for its first ``num_tokens``."""
        idle_prefix = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        fresh = self.blocks_for(num_tokens) - len(prefix)
        return max(fresh, 0) + idle_prefix <= self.num_free

    def admit(self, seq: Sequence, prefix: list[int]) -> None:
        """Give ``seq`` the cached ``prefix`` blocks: their tokens count as computed."""
        assert not seq.block_table, f"{seq} already holds blocks"
        for block_id in prefix:
            self._take(block_id, keep_contents=True)
        seq.block_table = list(prefix)
        seq.num_computed = len(prefix) * self.block_size

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make ``seq``'s table cover ``num_tokens`` tokens; False (and nothing taken) if the
        free blocks do not suffice."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed > self.num_free:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take(next(iter(self.free))))
        return True

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks.  The last block goes to the free list first, so a
        prompt's leading blocks, the likeliest to be shared again, are reused last."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (copy on write: see ``make_writable``)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed

    def make_writable(self, seq: Sequence, first_token: int) -> list[tuple[int, int]]:
        """Before ``seq`` writes from token ``first_token`` on: each shared block it would write
        into is replaced by a private copy.  Returns the (source, destination) block copies the
        runner must make; raises MemoryError if no block is free for a copy."""
        copies = []
        for index in range(first_token // self.block_size, len(seq.block_table)):
            block = self.blocks[seq.block_table[index]]
            if block.ref_count > 1:
                if not self.free:
                    raise MemoryError("no free block for a copy-on-write")
                fresh = self._take(next(iter(self.free)))
                block.ref_count -= 1
                seq.block_table[index] = fresh
                copies.append((block.block_id, fresh))
        return copies

    def _take(self, block_id: int, keep_contents: bool = False) -> int:
        """Hold a block: for its cached contents (a prefix hit), or as a fresh one whose old
        contents, about to be overwritten, leave the prefix cache."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        if not keep_contents and block.hash is not None:
            self._forget(block)
        block.ref_count += 1
        return block_id

    def _forget(self, block: Block) -> None:
        if self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.tokens = None, ()
