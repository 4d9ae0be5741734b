// The translation unit that builds the tests' shared precompiled header (CMakeLists.txt,
// CACHETTE_TEST_PCH); it has no code of its own.
