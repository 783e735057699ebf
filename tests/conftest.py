pytest_plugins = ["rig.fixtures"]
