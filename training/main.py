"""The main job: an entry script; the code is mmfusion/training/main.py.

    python training/main.py --help                      # or: mmfusion main --help
    python -m training.main ...                         # from the repository root
    accelerate launch -m training.main ...              # many processes
"""

from mmfusion.training.main import script

if __name__ == "__main__":
    script()
