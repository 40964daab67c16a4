// tanh(y) to about f32 precision for any finite y, without GLSL's tanh() or a bare exp formula.
//
// Why: Vulkan promises exp() only to (3 + 2|x|) ulp, and tanh() only as an exp formula, so
// (1 - e^-2y) / (1 + e^-2y) near y = 0 carries exp's absolute error into a small result: soft-
// capped attention scores (c tanh(s / c), c = 50) were off by ~1e-4 on lavapipe. Below |y| = 0.5
// an odd Taylor polynomial is used instead (the first omitted term is under 1e-7 relative there);
// above, the exp formula's error is relative to a result near 1 and harmless; e^-2|y| underflows
// to 0 for large |y|, giving exactly +-1.
float kvd_tanh(float y) {
  float a = abs(y);
  if (a < 0.5) {
    float y2 = y * y;
    return y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 +
           y2 * (62.0 / 2835.0 + y2 * (-1382.0 / 155925.0 + y2 * (21844.0 / 6081075.0 +
           y2 * (-929569.0 / 638512875.0))))))));
  }
  float t = exp(-2.0 * a);
  return sign(y) * (1.0 - t) / (1.0 + t);
}
