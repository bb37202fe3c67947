# Lets `pytest` import the six top-level modules from tests/ without installing the project.
