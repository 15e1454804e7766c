"""python -m exercises check N|all [--solution] [--dir=FOLDER]   (see exercises/README.md)"""
import sys

from exercises.check import main

sys.exit(main())
