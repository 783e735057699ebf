pytest_plugins = ["rig.fixtures", "support_fixtures"]
