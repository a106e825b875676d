"""The captions job: an entry script; the code is mmfusion/training/captions.py.

    python training/captions.py --help                      # or: mmfusion captions --help
    python -m training.captions ...                         # from the repository root
    accelerate launch -m training.captions ...              # many processes
"""

from mmfusion.training.captions import script

if __name__ == "__main__":
    script()
