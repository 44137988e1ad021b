"""kvlink: move a transformer's KV cache between agents, compressed to a byte budget.

The library holds everything that is not a process: model loading and
fingerprints (`models`), KV extraction and cache rebuilding (`cache`),
position selection (`select`), quantization (`quant`), low rank (`lowrank`),
the codec pipeline (`codec`), the receiver's decode loop (`generate`), the
wire format (`wire`), the budget planner (`budget`) and evaluation (`eval`).
Importing kvlink never needs a GPU or Triton.
"""

__version__ = "0.1.0"
