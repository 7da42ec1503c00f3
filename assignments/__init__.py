"""A course kit made from the project's own code: the handout, a starter maker and an autograder.

    python -m assignments.make OUT       # a student starter repository: the listed functions blanked
    python -m assignments.grade REPO     # score a student repository, part by part

See assignments/README.md (for instructors) and assignments/HANDOUT.md (for students).
"""
