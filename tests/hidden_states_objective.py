"""A custom objective that reads the model the way a researcher's loss does: `model.hidden_states(...)`, then the
head (`model.logits`) outside the model's forward. Importing this module registers it as "hidden-states-sft"
(tests/test_distributed.py trains it under FSDP2 on 2 ranks, where the model's root parameters are sharded outside
its forward, against one process)."""
import torch.nn.functional as F

import velotune as vt
from velotune.data.encode import IGNORE_INDEX
from velotune.training.objectives.sft import SFT


class HiddenStatesSFT(SFT):
    name = "hidden-states-sft"

    def loss(self, model, batch):
        hidden = model.hidden_states(batch["input_ids"], position_ids=batch.get("position_ids"),
                                     document_ids=batch.get("document_ids"),
                                     attention_mask=batch.get("attention_mask"))
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        logits = model.logits(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (targets != IGNORE_INDEX).sum()


vt.register_objective(HiddenStatesSFT.name, HiddenStatesSFT)
