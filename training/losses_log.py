"""The loss terms of the training, kept on the device between two reads (each read waits for the device)."""

import numpy as np
import torch


class PendingLosses:
    """The loss terms of each iteration, kept on the device and read in one go (each read waits for the device)."""

    def __init__(self):
        self.pending = []

    def add(self, **terms):
        self.pending.append({name: value.detach() for name, value in terms.items() if value is not None})

    def read(self):
        """The terms of the iterations since the last read, as floats: a list of {name: value}."""
        if not self.pending:
            return []
        names = [list(terms) for terms in self.pending]
        values = torch.stack([value.float() for terms in self.pending for value in terms.values()]).cpu().tolist()
        self.pending.clear()
        read, position = [], 0
        for keys in names:
            read.append(dict(zip(keys, values[position:position + len(keys)])))
            position += len(keys)
        return read


def mean_terms(records):
    """{name: mean over the records that have it} of a list of {name: value}."""
    names = dict.fromkeys(name for record in records for name in record)
    return {name: float(np.mean([record[name] for record in records if name in record])) for name in names}
