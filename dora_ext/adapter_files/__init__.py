"""DoRA adapter files of the diffusion ecosystem: LyCORIS / kohya sd-scripts, OneTrainer, ai-toolkit and PEFT /
diffusers, read into one neutral form (neutral.ModuleAdapter per module), written back, converted where exact, and
loaded onto a model as dora_ext's layers.

    neutral.py        the neutral form and its magnitude layouts
    module_names.py   kohya module names ↔ the model's module paths
    kohya_reader.py   LyCORIS / kohya / OneTrainer / ai-toolkit state dicts → neutral, format detection
    peft_form.py      neutral ↔ PEFT (config + tensors); a dora_ext model's adapters
    reading.py        read_adapter_file: any file, directory or state dict
    writers.py        save_lycoris, save_ai_toolkit, save_peft
    conversions.py    lycoris_to_peft, peft_to_lycoris
    loading.py        load_lycoris
"""

from .conversions import lycoris_to_peft, peft_to_lycoris
from .kohya_reader import FORMATS, detect_format
from .loading import load_lycoris
from .module_names import KNOWN_PREFIXES
from .neutral import ModuleAdapter
from .peft_form import model_adapters
from .reading import read_adapter_file
from .writers import save_ai_toolkit, save_lycoris, save_peft

__all__ = ["ModuleAdapter", "FORMATS", "KNOWN_PREFIXES", "detect_format", "read_adapter_file", "model_adapters",
           "save_lycoris", "save_ai_toolkit", "save_peft", "lycoris_to_peft", "peft_to_lycoris", "load_lycoris"]
