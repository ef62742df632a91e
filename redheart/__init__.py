"""Red Heart AI training system: a multi-task model of emotion, Bentham's hedonic calculus,
regret and SURD shares, trained from the command line (`redheart ...` / `run_learning.sh`)."""

__version__ = "1.0.0"
