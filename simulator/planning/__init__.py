"""Capacity planning: the plan's points and verdict (planner.py) and their runner on Ray
(runner.py); the command line is simulator/plan.py."""
