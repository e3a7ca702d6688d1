"""ftbench: which way of fine-tuning a pre-trained language model should I use?"""

__version__ = "0.1.0"
