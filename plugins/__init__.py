"""samflow's built-in plugins, one folder each, registered through the ``samflow.plugins`` entry points."""
