"""python -m services.tuner"""

from services.tuner.app import main

main()
