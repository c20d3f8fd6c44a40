"""Base of the loaders that cut and batch this rank's shard themselves (``DeviceLoader``, ``DaliShardLoader``)."""
from __future__ import annotations

__all__ = ["ShardBatchLoader"]


class ShardBatchLoader:
    """Batch count and epoch selection shared by the self-sharding loaders.

    The subclass sets ``train``, ``batch_size``, ``num_samples`` (this rank's sample count) and
    ``epoch``. Train drops the last partial batch; eval keeps it.
    """

    train: bool
    batch_size: int
    num_samples: int
    epoch: int

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the order and augmentation of ``epoch`` (train only; eval order never changes)."""
        self.epoch = int(epoch)
