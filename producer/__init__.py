"""mmq producers: the command line now; the SDK and the HTTP API come with the queue."""
