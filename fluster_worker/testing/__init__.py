"""In-memory fakes for unit tests of one component, shipped as treq ships
``treq.testing``. Each module fakes one side-effecting dependency."""
