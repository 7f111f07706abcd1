if __name__ == "__main__":  # not in a child process that spawn starts (grammar workers) and that imports this
    from server.cli import main

    main()
