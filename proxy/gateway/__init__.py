"""The request's path through the gateway: authenticate, authorise, admit, forward, account;
and the key watch that keeps echowin's key out of every answer."""
