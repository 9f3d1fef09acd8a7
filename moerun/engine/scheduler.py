"""The scheduler of one DP replica: waiting and running queues, a block allocator, and
the choice of what each micro-batch computes next.

A request joins the least-loaded micro-batch when it arrives and stays in it. Each call
to ``schedule(mb)`` plans one step of micro-batch ``mb`` under a token budget: running
requests of that micro-batch first (oldest first; a decode costs one token, an
unfinished prompt continues in chunks), then waiting requests are admitted into it
while tokens and blocks last. When a running request needs a block and none is free,
the youngest other request of the micro-batch is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed (prompt + tokens so far). Only the
planned micro-batch is touched, so nothing in flight in the pipeline loses its blocks.
"""
from __future__ import annotations

from collections import deque

from .request import Request, SeqStep, Status


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.free = deque(range(num_blocks))

    def take(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.popleft() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_batch_tokens: int, num_micro_batches: int):
        self.blocks = BlockAllocator(num_blocks)
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.num_micro_batches = num_micro_batches
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start (the server's counter)

    def load(self) -> int:
        """Tokens this replica still has to hold: for spreading requests over replicas."""
        return sum(r.max_len for r in self.running) + sum(r.max_len for r in self.waiting)

    def add(self, req: Request) -> None:
        """Queue a request in the micro-batch with the least work, for its lifetime (the
        pipeline stays balanced: every micro-batch carries about the same tokens)."""
        loads = [0] * self.num_micro_batches
        for r in list(self.running) + list(self.waiting):
            loads[r.micro_batch] += r.max_len
        req.micro_batch = min(range(self.num_micro_batches), key=loads.__getitem__)
        self.waiting.append(req)

    def _blocks_needed(self, req: Request, upto: int) -> int:
        return -(-upto // self.block_size) - len(req.blocks)

    def _grow(self, req: Request, upto: int) -> bool:
        need = self._blocks_needed(req, upto)
        if need <= 0:
            return True
        got = self.blocks.take(need)
        if got is None:
            return False
        req.blocks += got
        return True

    def free(self, req: Request) -> None:
        self.blocks.give(req.blocks)
        req.blocks = []

    def _preempt(self, victim: Request) -> None:
        self.free(victim)
        self.running.remove(victim)
        victim.status, victim.num_computed = Status.WAITING, 0
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self, mb: int) -> list[SeqStep]:
        budget, steps = self.max_batch_tokens, []
        chosen: list[tuple[Request, int]] = []
        for req in [r for r in self.running if r.micro_batch == mb]:
            if budget == 0 or req.status is not Status.RUNNING:
                continue
            n = min(len(req.tokens) - req.num_computed, budget)
            while not self._grow(req, req.num_computed + n):
                victims = [r for r in self.running if r.micro_batch == mb and r is not req
                           and r not in [c for c, _ in chosen]]
                self._preempt(victims[-1] if victims else req)
                if not victims:
                    break
            if req.status is Status.RUNNING:
                chosen.append((req, n))
                budget -= n
        for req in [r for r in self.waiting if r.micro_batch == mb]:
            if budget == 0:
                break
            n = min(len(req.tokens) - req.num_computed, budget)
            if self._blocks_needed(req, req.num_computed + n) > len(self.blocks.free):
                break  # first come, first served: do not let later requests overtake
            self.waiting.remove(req)
            self._grow(req, req.num_computed + n)
            req.status = Status.RUNNING
            self.running.append(req)
            chosen.append((req, n))
            budget -= n
        for req, n in chosen:
            start = req.num_computed
            sample = start + n == len(req.tokens)
            steps.append(SeqStep(req.id, tuple(req.blocks), start, tuple(req.tokens[start:start + n]), sample,
                                 req.params if sample else None))
            req.in_flight = True
        return steps

    def finish(self, req: Request) -> None:
        req.status = Status.FINISHED
        self.free(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
