from services.compressor.app import main

main()
